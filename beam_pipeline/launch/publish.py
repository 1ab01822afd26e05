"""The output side of a run: staging, the existing-output check, the commit.

A run writes into ``OUT/_incomplete-<run id>/``. When the job succeeded, the
launcher moves each staged file into its table's folder under a name of the
run's own (``part-<run id>-SSSSS-of-NNNNN.parquet``: no earlier version's
file is touched) and commits them as one new version of each Delta table,
the reports first and the slices last (``beam_pipeline.dataset.versions``):
the slices commit, one conditional put of one log file, is the instant the
new version exists. Killed at any point before it, the run has published
nothing a reader sees: the previous version is the latest, file for file;
the next run removes what the killed one left. Works on a local disk and on
object stores (``s3://``, ``gs://``), where moving is a parallel
server-side copy.

Locally the staging folder is made by the launcher, mode 0700 and only if
nothing is there (``make_staging``), so no other user can plant a file in
it; a table folder, its log or the old layout's summary that is a link or
a FIFO (planted in a shared output) is refused before the run and again
before and after the move (``check_entries``); the files are moved between
the folders' descriptors, none opened through a link, so a table folder
swapped for a link in between is refused, never written through; moved
files replace, never follow, whatever is at their names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time

from beam_pipeline.dataset import versions
from transforms.contract import digests, local_files, schema
from transforms.contract.errors import UsageError
from transforms.io import stores
from transforms.io.protocol import is_local

_LOG = logging.getLogger(__name__)

DATA_ENTRIES = (schema.SLICES_DIR, schema.RECONCILIATION_DIR, schema.ERRORS_DIR)
# The reports first: the slices commit names the versions they got.
_COMMIT_ORDER = (schema.RECONCILIATION_DIR, schema.ERRORS_DIR, schema.SLICES_DIR)
_SCHEMAS = {
  schema.SLICES_DIR: schema.SLICE_SCHEMA,
  schema.RECONCILIATION_DIR: schema.RECONCILIATION_SCHEMA,
  schema.ERRORS_DIR: schema.ERROR_SCHEMA,
}
# Every table keeps its whole log (old versions stay readable until the user
# vacuums their files) and takes a checkpoint every 100 commits.
_TABLE_CONFIG = {
  'delta.enableExpiredLogCleanup': 'false',
  'delta.checkpointInterval': '100',
}
AUDIT_EVENT = 'cardiac_mri.publish'
# A report's commit replaces whatever version is latest: no dataset names a
# report version until the slices commit does.
_LATEST = -1


class CommitConflict(UsageError):
  """Another run committed to the output after this one started from it."""


def staging_path(output: str, run_id: str) -> str:
  """Where the run ``run_id`` writes before its files are committed to
  ``output``: a folder of its own, so no run can publish another's files."""
  return stores.join(output, f'{schema.STAGING_DIR}-{run_id}')


exists = stores.exists
delete_tree = stores.delete_tree


# Stores whose tables deltalake reaches through its own client. Elsewhere
# (gs://) a commit is made against a local copy of the table's log and its
# new log file created on the store with our client's conditional create:
# deltalake's GCS client speaks the XML API, which no GCS emulator here
# serves, so it could not be tested.
_NATIVE = ('s3://',)


@contextlib.contextmanager
def _log_view(uri: str):
  """``(where, push)``: where deltalake opens the table at ``uri``, and
  ``push()``, which makes the commits written there since the view opened
  part of the table (a no-op where deltalake writes to the store itself).

  Raises (push): CommitConflict when another writer made that version first.
  """
  if is_local(uri) or uri.startswith(_NATIVE):
    yield uri, lambda: None
    return
  log = stores.join(uri, versions.LOG_DIR)
  with tempfile.TemporaryDirectory(prefix='cardiac-mri-log-') as mirror:
    local_log = os.path.join(mirror, versions.LOG_DIR)
    os.makedirs(local_log)
    for path in stores.files_under(log):
      name = path[len(log) + 1 :]
      if '/' not in name:
        with open(os.path.join(local_log, name), 'wb') as f:
          f.write(stores.read_bytes(path))
    before = set(os.listdir(local_log))

    def push() -> None:
      made = sorted(set(os.listdir(local_log)) - before)
      commits = [n for n in made if n.endswith('.json') and n[:20].isdigit()]
      for name in commits + [n for n in made if n not in commits]:
        with open(os.path.join(local_log, name), 'rb') as f:
          data = f.read()
        target = stores.join(log, name)
        if name in commits:
          if not stores.store(target).create_exclusive(target, data):
            raise CommitConflict(f'{target} was made by another run')
        elif not name.startswith('.'):
          stores.write_bytes(target, data)  # checkpoints: derived, rewritable
      before.update(made)

    yield mirror, push


def is_table(output: str) -> bool:
  """Whether ``output`` holds the slices table's log."""
  return exists(stores.join(output, schema.SLICES_DIR, versions.LOG_DIR))


def start_of(output: str) -> tuple[int | None, dict | None, int | None]:
  """(version, record, committed): the slices table's latest version, which
  this run starts from, the newest run record in its log and when it was
  committed (ms since the epoch); (None, None, None): there is no table yet.
  The slices commit is made against that version, so a run that committed
  meanwhile is never overwritten unseen."""
  if not is_table(output):
    return None, None, None
  from deltalake import DeltaTable

  table = stores.join(output, schema.SLICES_DIR)
  with _log_view(table) as (where, _):
    found = DeltaTable(where, storage_options=stores.table_options(table))
    version = found.version()
    for commit in found.history():
      record = commit.get(versions.RECORD_KEY)
      if isinstance(record, dict):
        return version, record, commit.get('timestamp')
  return version, None, None


def made_from(output: str) -> str | None:
  """The --input of the latest version of ``output`` (None: no version)."""
  record = start_of(output)[1]
  return None if record is None else record.get('input')


def check_replaceable(output: str, overwrite: bool, input_root: str) -> None:
  """Raises UsageError, unless ``overwrite``, if ``output`` holds something
  a new version cannot be added to (the layout before schema 3, or other
  files) or a dataset made from another input. A run of the same input into
  an existing dataset adds a version and needs no --overwrite: the previous
  versions stay readable. Whatever ``overwrite``, an entry the run writes
  through that is not what this pipeline makes there (``check_entries``) is
  refused."""
  check_entries(output)
  try:
    if is_table(output):
      source = made_from(output)
      if source not in (None, input_root) and not overwrite:
        raise UsageError(
          f'--output {output} holds versions made from {source}; pass '
          f'--overwrite to add a version made from {input_root} (the earlier '
          'versions stay readable), or choose another --output'
        )
      return
    old = [
      e for e in (*DATA_ENTRIES, schema.SUMMARY_FILE) if exists(stores.join(output, e))
    ]
  except OSError as e:  # e.g. a bucket that does not exist
    raise UsageError(f'--output {output} is not writable: {e}') from e
  if old and not overwrite:
    layout = (
      'a dataset of the layout before schema 3'
      if schema.SUMMARY_FILE in old
      else 'files that are not a dataset'
    )
    raise UsageError(
      f'--output {output} holds {layout} ({", ".join(old)}); pass --overwrite '
      'to replace it with versioned Delta tables (docs/OUTPUT.md#upgrading), '
      'or choose another --output'
    )


def staging_folders(output: str) -> list[str]:
  """Every run's staging folder in ``output`` (a live run's too), sorted."""
  if is_local(output):
    names = os.listdir(output) if os.path.isdir(output) else []
    return sorted(
      {os.path.join(output, n) for n in names if n.startswith(schema.STAGING_DIR)}
    )
  prefix = output.rstrip('/') + '/'
  return sorted(
    {
      prefix + path[len(prefix) :].split('/', 1)[0]
      for path in stores.files_under(output)
      if path[len(prefix) :].startswith(schema.STAGING_DIR)
    }
  )


# What a run writes through in a local output, and what each must be: a
# table folder and its log a folder (not a link: the run would write the
# new version where it leads), the old layout's summary a file (not a link,
# whose target a run with --overwrite would be told to replace).
def _entries(output: str) -> list[tuple[str, str]]:
  folders = [os.path.join(output, table) for table in DATA_ENTRIES]
  folders += [os.path.join(folder, versions.LOG_DIR) for folder in folders]
  return [(path, 'a folder') for path in folders] + [
    (os.path.join(output, schema.SUMMARY_FILE), 'a file')
  ]


def check_entries(output: str) -> None:
  """Raises UsageError if a local ``output`` holds, where a run writes, a
  symbolic link, a FIFO or anything else this pipeline does not make there
  (anyone who may write in a shared output could plant one)."""
  if not is_local(output):
    return
  for path, wanted in _entries(output):
    try:
      found = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
      continue
    what = local_files.kind(found)
    if what != wanted:
      raise UsageError(
        f'--output {output}: {path} is {what}, not {wanted} this pipeline made; '
        'remove it, or choose another --output'
      )


def make_staging(output: str, run_id: str) -> str:
  """Makes the run's staging folder in a local ``output``: mode 0700, made
  here or not at all, so nothing in it was planted (on an object store
  there are no folders); returns it.

  Raises:
    UsageError: something is already there.
  """
  staging = staging_path(output, run_id)
  if is_local(output):
    try:
      os.mkdir(staging, 0o700)
    except FileExistsError:
      raise UsageError(
        f'--output {output}: {staging} exists, made by something else than '
        'this run; remove it'
      ) from None
  return staging


def clear_staging(output: str) -> None:
  """Deletes what interrupted runs left: their staging folders, and files in
  the table folders that no version names (call it holding the output's
  lock: no other run is writing then)."""
  for staging in staging_folders(output):
    _LOG.warning('removing %s, left by an interrupted run', staging)
    delete_tree(staging)
  if is_table(output):  # a folder of the older layout is kept until replaced
    remove_unnamed(output)


def _named_by_log(output: str, table: str) -> set[str]:
  """The data files any commit of ``table`` adds, relative to the table."""
  log = stores.join(output, table, versions.LOG_DIR)
  named = set()
  for path in stores.files_under(log):
    if path.endswith('.json') and '/_' not in path[len(log) :]:
      data = stores.read_bytes(path)
      named |= {
        name for kind, name in versions.file_actions(path, data) if kind == 'add'
      }
  return named


def remove_unnamed(output: str) -> list[str]:
  """Deletes the Parquet files in the table folders that no commit names
  (an interrupted run's, or the layout before schema 3); returns them."""
  removed = []
  for table in DATA_ENTRIES:
    folder = stores.join(output, table)
    if not exists(folder):
      continue
    named = _named_by_log(output, table)
    prefix = folder.rstrip('/') + '/'
    unnamed = [
      path
      for path in stores.files_under(folder)
      if path.endswith('.parquet')
      and '/' not in path[len(prefix) :]
      and path[len(prefix) :] not in named
    ]
    if unnamed:
      _LOG.warning(
        'removing %d file(s) in %s that no version names (left by an '
        'interrupted run, or an older layout)',
        len(unnamed),
        folder,
      )
      stores.store(folder).delete(unnamed)
      removed += unnamed
  summary = stores.join(output, schema.SUMMARY_FILE)
  if removed or (is_table(output) and exists(summary)):
    stores.store(summary).delete([summary])
  return removed


def take_manifests(output: str, run_id: str) -> dict[str, dict]:
  """The staged files, {path relative to the output: entry}: size, digest,
  Delta statistics, and on an object store the object holding the file
  (``digests.SOURCE``), from the manifest each table's sink wrote; the
  manifests are removed, so only the commits record the files."""
  staging = staging_path(output, run_id)
  files = {}
  for entry in DATA_ENTRIES:
    path = stores.join(staging, entry, digests.MANIFEST_FILE)
    manifest = json.loads(stores.read_bytes(path))
    stores.store(path).delete([path])
    files.update({f'{entry}/{name}': v for name, v in sorted(manifest.items())})
  return files


def recorded(files: dict[str, dict]) -> dict[str, dict]:
  """``files`` as the run record holds them: size and digest only."""
  return {
    path: {k: v for k, v in entry.items() if k not in (digests.SOURCE, digests.STATS)}
    for path, entry in files.items()
  }


def published_name(path: str, run_id: str) -> str:
  """``slices/part-00000-of-00002.parquet`` as the run ``run_id`` publishes
  it: ``slices/part-<run id>-00000-of-00002.parquet``."""
  folder, name = path.rsplit('/', 1)
  return f'{folder}/part-{run_id}-{name.removeprefix("part-")}'


def published(files: dict[str, dict], run_id: str) -> dict[str, dict]:
  """``files`` (take_manifests) under the names they are committed with."""
  return {published_name(path, run_id): entry for path, entry in files.items()}


def publish(
  output: str,
  run_id: str,
  files: dict[str, dict],
  record: dict,
  start: int | None,
  kept: dict[str, dict] | None = None,
  removed: dict[str, int] | None = None,
) -> int:
  """Moves the staged ``files`` (take_manifests) into the table folders and
  commits them as the new version of each table, ``record`` (the run's
  counters and settings) in the slices commit; removes the staging folder.

  Args:
    start: the slices table's version when the run started (start_of).
    kept: for an incremental run, the start version's slice files the new
      version keeps ({path relative to the output: record entry}); None:
      the new version's slices are ``files`` alone.
    removed: for an incremental run, the start version's slice files the
      new version drops ({path relative to the output: bytes}).

  Returns:
    The new dataset version.

  Raises:
    CommitConflict: another run committed after ``start``: nothing of this
      run is a version (its reports' commits, if any, no version names).
  """
  staging = staging_path(output, run_id)
  final = published(files, run_id)
  check_entries(output)  # again: a link planted while the job ran
  # Audit events (sys.audit) mark each step: the kill tests stop the
  # launcher at each of them (tests/test_versions.py).
  sys.audit(AUDIT_EVENT, 'move')
  _move(
    output,
    [
      (
        entry.get(digests.SOURCE) or stores.join(staging, path),
        stores.join(output, published_name(path, run_id)),
      )
      for path, entry in files.items()
    ],
  )
  check_entries(output)  # and after: the commits write the logs by path
  made = {}
  for table in _COMMIT_ORDER[:-1]:
    sys.audit(AUDIT_EVENT, f'commit {table}')
    made[table] = _commit(output, table, final, {versions.RUN_KEY: run_id}, _LATEST)
  record = {
    **record,
    'run_id': run_id,
    versions.REPORT_VERSIONS: made,
    digests.FILES: dict(sorted({**recorded(final), **(kept or {})}.items())),
  }
  record[digests.SUMMARY_DIGEST] = digests.of_summary(record)
  sys.audit(AUDIT_EVENT, f'commit {schema.SLICES_DIR}')
  version = _commit(
    output, schema.SLICES_DIR, final, {versions.RECORD_KEY: record}, start, removed
  )
  sys.audit(AUDIT_EVENT, 'committed')
  try:  # the version is committed: what is left to tidy can fail no run
    delete_tree(staging)
    summary = stores.join(output, schema.SUMMARY_FILE)
    if stores.store(summary).exists(summary):  # the layout before schema 3
      remove_unnamed(output)  # its files, replaced by this version
  except Exception as e:
    _LOG.warning(
      'version %d is published; tidying %s failed (%s): the next run removes '
      'what is left',
      version,
      output,
      e,
    )
  return version


def _move(output: str, pairs: list[tuple[str, str]]) -> None:
  """Moves the staged files to their tables' folders: in a local output
  through the folders' descriptors, none of them reached through a link
  (``stores.move_all``), so a table folder swapped for a link after
  ``check_entries`` looked is refused (UsageError), never written through."""
  if not is_local(output):
    stores.move_all(pairs)
    return
  try:
    stores.move_all(pairs, under=output)
  except local_files.PlantedError as e:
    check_entries(output)  # names the entry as before the run
    raise UsageError(f'--output {output}: {e}') from None


def _adds(table: str, files: dict[str, dict]) -> list:
  from deltalake.transaction import AddAction

  now = int(time.time() * 1000)
  return [
    AddAction(
      path.split('/', 1)[1],
      entry['bytes'],
      {},
      now,
      True,
      entry.get(digests.STATS) or json.dumps({'numRecords': None}),
    )
    for path, entry in sorted(files.items())
    if path.split('/', 1)[0] == table
  ]


def _removes(table: str, removed: dict[str, int]) -> list:
  from deltalake.transaction import RemoveAction

  now = int(time.time() * 1000)
  return [
    RemoveAction(path.split('/', 1)[1], True, now, size)
    for path, size in sorted(removed.items())
    if path.split('/', 1)[0] == table
  ]


def _commit(
  output: str,
  table: str,
  files: dict[str, dict],
  metadata: dict,
  start: int | None,
  removed: dict[str, int] | None = None,
) -> int:
  """Commits ``table``'s files in ``files`` as the table's whole new version
  (an overwrite: the previous version's files stay on disk for it), or with
  ``removed`` ({path: bytes}) as a change of the version ``start``: those
  files dropped, ``files`` added, the others kept. Returns the version
  made. ``start``: the version the change was made against (None: there
  was no table; _LATEST: whatever is latest)."""
  uri = stores.join(output, table)
  options = stores.table_options(uri)
  actions = _adds(table, files)
  if removed is not None:
    actions += _removes(table, removed)
  try:
    with _log_view(uri) as (where, push):
      version = _transact(
        where, table, actions, metadata, start, options, removed is not None
      )
      push()
  except CommitConflict as e:
    raise CommitConflict(
      f'--output {output}: another run committed to {table} while this one '
      f'ran; nothing of this run was published (run it again: it starts from '
      'the new version)'
    ) from e
  return version


def _transact(
  where: str,
  table: str,
  actions: list,
  metadata: dict,
  start: int | None,
  options,
  change: bool = False,
) -> int:
  """One commit of ``actions`` to the table at ``where``, replacing its
  files (or, with ``change``, adding to and removing from them); returns
  its version."""
  from deltalake import DeltaTable, Schema
  from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError
  from deltalake.transaction import (
    CommitProperties,
    PostCommitHookProperties,
    create_table_with_add_actions,
  )

  arrow_schema = _SCHEMAS[table]
  properties = CommitProperties(custom_metadata=metadata, max_commit_retries=0)
  hooks = PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=False)
  try:
    try:
      at = None if start in (None, _LATEST) else start
      current = DeltaTable(where, version=at, storage_options=options)
    except TableNotFoundError:
      if start not in (None, _LATEST):
        raise
      create_table_with_add_actions(
        where,
        Schema.from_arrow(arrow_schema),
        actions,
        mode='error',
        configuration=_TABLE_CONFIG,
        storage_options=options,
        commit_properties=properties,
        post_commithook_properties=hooks,
      )
      return 0
    read = current.version()
    if start is None:  # made by another run since this one started
      raise CommitConflict(f'{where} was created by another run')
    current.create_write_transaction(
      actions,
      mode='append' if change else 'overwrite',
      schema=arrow_schema,
      commit_properties=properties,
      post_commithook_properties=hooks,
    )
  except (CommitFailedError, DeltaError, TableNotFoundError) as e:
    if 'already exists' not in str(e) and not isinstance(e, CommitFailedError):
      raise
    raise CommitConflict(str(e)) from e
  return _made(where, options, read, metadata)


def _made(uri: str, options: dict, read: int, metadata: dict) -> int:
  """The version of the commit carrying ``metadata`` (made after ``read``)."""
  from deltalake import DeltaTable

  key = next(iter(metadata))
  mine = metadata[key]
  mine = mine.get('run_id') if isinstance(mine, dict) else mine
  for commit in DeltaTable(uri, storage_options=options).history():
    if commit['version'] <= read:
      break
    found = commit.get(key)
    found = found.get('run_id') if isinstance(found, dict) else found
    if found == mine:
      return commit['version']
  raise OSError(f'{uri}: the commit made after version {read} is not in its log')


def absolute(path: str) -> str:
  """A local path made absolute; other file systems' paths as given."""
  return os.path.abspath(path) if is_local(path) else path
