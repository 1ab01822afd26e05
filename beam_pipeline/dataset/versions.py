"""The dataset's versions: three Delta Lake tables and the run record of each.

An output folder holds three Delta tables (``slices/``, ``reconciliation/``,
``errors/``, each with its ``_delta_log/``). A run commits the reports first
and the slices last; the slices table's version is the dataset's version,
and its commit carries the run's record (what ``_SUMMARY.json`` held before
schema 3): counters, options, input, run id, every file of the version with
its size and digest, the versions of the two reports that go with it, and a
digest of the record itself. A run killed before its slices commit has made
no version: the reports may then hold a version that no dataset names, and
every reader here pairs the tables through the record, never by their
latest versions.

Local folders only, read with ``deltalake`` and the log's JSON: no Beam.
"""

from __future__ import annotations

import json
import os

from transforms.contract import digests, schema

TABLES = (schema.SLICES_DIR, schema.RECONCILIATION_DIR, schema.ERRORS_DIR)
LOG_DIR = '_delta_log'
# The commit-info key holding the run record (the slices table's commits),
# and the one naming the run in a report's commit.
RECORD_KEY = 'cardiac_mri'
RUN_KEY = 'cardiac_mri_run'
# The record's key for the versions of the reports that go with it.
REPORT_VERSIONS = 'tables'
VERSION = 'version'


class DatasetError(ValueError):
  """The folder is not a complete, unaltered pipeline output: no committed
  version, a version that does not exist, a log or run record that is not as
  this pipeline writes it, or a file missing, extra, resized or changed
  against the run record's digests."""


def log_path(output: str, table: str, version: int) -> str:
  """The commit file of ``version`` of ``table``."""
  return os.path.join(output, table, LOG_DIR, f'{version:020d}.json')


def _versions_on_disk(output: str, table: str) -> list[int]:
  folder = os.path.join(output, table, LOG_DIR)
  try:
    names = os.listdir(folder)
  except FileNotFoundError:
    return []
  found = []
  for name in names:
    stem, dot, ext = name.partition('.')
    if ext == 'json' and len(stem) == 20 and stem.isdigit():
      found.append(int(stem))
  return sorted(found)


def commit_info(output: str, table: str, version: int) -> dict:
  """The ``commitInfo`` action of one commit.

  Raises:
    DatasetError: no such version (or its commit file is unreadable).
  """
  path = log_path(output, table, version)
  try:
    with open(path, 'rb') as f:
      for line in f:
        action = json.loads(line)
        if isinstance(action, dict) and 'commitInfo' in action:
          info = action['commitInfo']
          if not isinstance(info, dict):
            raise DatasetError(
              f'{path} is unreadable: its commitInfo is {_kind(info)}, not an object'
            )
          return info
  except FileNotFoundError:
    raise DatasetError(
      f'{output} has no version {version} (versions: {_span(output)})'
    ) from None
  except DatasetError:
    raise
  except (OSError, ValueError) as e:
    raise DatasetError(f'{path} is unreadable: {e}') from None
  return {}


def _span(output: str) -> str:
  found = _versions_on_disk(output, schema.SLICES_DIR)
  if not found:
    return 'none'
  return f'{found[0]}' if len(found) == 1 else f'{found[0]} to {found[-1]}'


def versions(output: str) -> list[int]:
  """Every version of the dataset, oldest first (the slices table's
  commits that carry a run record)."""
  return [
    v
    for v in _versions_on_disk(output, schema.SLICES_DIR)
    if RECORD_KEY in commit_info(output, schema.SLICES_DIR, v)
  ]


def _no_dataset(output: str) -> DatasetError:
  if os.path.exists(os.path.join(output, schema.SUMMARY_FILE)):
    return DatasetError(
      f'{output} holds a dataset of the layout before schema 3 (plain Parquet '
      'folders and _SUMMARY.json); this version reads Delta tables: run the '
      'pipeline into it again with --overwrite (docs/OUTPUT.md#upgrading)'
    )
  return DatasetError(
    f'{output} holds no committed version: no run completed into it (a '
    "version exists only once the slices table's commit is written)"
  )


def latest(output: str) -> int:
  """The newest version: the newest slices commit that carries a run record
  (read from the newest down, so usually one commit file is read).

  Raises:
    DatasetError: there is none.
  """
  for v in reversed(_versions_on_disk(output, schema.SLICES_DIR)):
    if RECORD_KEY in commit_info(output, schema.SLICES_DIR, v):
      return v
  raise _no_dataset(output)


def record(output: str, version: int | None = None) -> dict:
  """The run record of ``version`` (default: the latest), checked against
  its own digest, with ``version`` added.

  Raises:
    DatasetError: no such version, a record altered, or one written by
      another schema version.
  """
  if version is None:
    version = latest(output)
  elif not isinstance(version, int) or isinstance(version, bool) or version < 0:
    raise DatasetError(f'version must be a whole number >= 0, got {version!r}')
  elif not _versions_on_disk(output, schema.SLICES_DIR):
    raise _no_dataset(output)
  found = commit_info(output, schema.SLICES_DIR, version).get(RECORD_KEY)
  if not isinstance(found, dict) or digests.FILES not in found:
    raise DatasetError(
      f'version {version} of {output} was not committed by this pipeline '
      '(its commit carries no run record)'
    )
  if found.get(digests.SUMMARY_DIGEST) != digests.of_summary(found):
    raise DatasetError(
      f'the run record of version {version} of {output} was altered: its '
      'content does not match its digest'
    )
  written = found.get('schema_version')
  if written != schema.SCHEMA_VERSION:
    raise DatasetError(
      f'version {version} of {output} was written with schema version '
      f'{written}; this reader reads schema {schema.SCHEMA_VERSION} '
      '(docs/OUTPUT.md#upgrading)'
    )
  problem = _record_problem(found)
  if problem is not None:
    raise DatasetError(
      f'the run record of version {version} of {output} is not one this '
      f'pipeline writes: {problem}'
    )
  return {**found, VERSION: version}


def _kind(value) -> str:
  """The JSON type of ``value``, as a message names it."""
  if value is None:
    return 'null'
  if isinstance(value, bool):
    return f'{str(value).lower()} (a boolean)'
  if isinstance(value, int | float):
    return f'the number {value!r}'
  if isinstance(value, str):
    return 'a string'
  return 'a list' if isinstance(value, list) else 'an object'


def _whole(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# The run record's fields that the readers and tools read, beside ``files``
# and ``tables``: (key, required, test, what it must be).
_FIELDS = (
  (
    'counters',
    True,
    lambda v: isinstance(v, dict) and all(map(_whole, v.values())),
    'an object of whole numbers',
  ),
  (
    'dropped_duplicates',
    False,
    lambda v: isinstance(v, dict) and all(map(_whole, v.values())),
    'an object of whole numbers',
  ),
  ('input', False, lambda v: v is None or isinstance(v, str), 'a string'),
  ('run_id', False, lambda v: isinstance(v, str), 'a string'),
  *(
    (name, False, lambda v: isinstance(v, bool), 'true or false')
    for name in ('labeled_only', 'strict', 'drop_duplicates', 'pseudonymized')
  ),
)


def _record_problem(found: dict) -> str | None:
  """What in a run record (whose digest matches) does not have the shape the
  readers and tools read, or None: a record edited and its digest made
  again must be a DatasetError, never a TypeError or KeyError further on."""
  files = found.get(digests.FILES)
  if not isinstance(files, dict):
    return f'{digests.FILES} is {_kind(files)}, not an object'
  for name, entry in files.items():
    where = f'{digests.FILES}[{name!r}]'
    if not isinstance(entry, dict):
      return f'{where} is {_kind(entry)}, not an object'
    if not _whole(entry.get('bytes')):
      return f'{where}.bytes is {_kind(entry.get("bytes"))}, not a whole number'
    if not isinstance(entry.get(digests.ALGORITHM), str):
      return f'{where}.{digests.ALGORITHM} is {_kind(entry.get(digests.ALGORITHM))}'
  tables = found.get(REPORT_VERSIONS)
  reports = {schema.RECONCILIATION_DIR, schema.ERRORS_DIR}
  if not isinstance(tables, dict) or set(tables) != reports:
    return (
      f'{REPORT_VERSIONS} is {_kind(tables)}, not an object of the versions of '
      f'{" and ".join(sorted(reports))}'
    )
  for table, number in tables.items():
    if not _whole(number):
      return f'{REPORT_VERSIONS}.{table} is {_kind(number)}, not a version number'
  for key, required, test, shape in _FIELDS:
    if key not in found:
      if required:
        return f'{key} is missing'
    elif not test(found[key]):
      return f'{key} is {_kind(found[key])}, not {shape}'
  return None


def table_versions(summary: dict) -> dict[str, int]:
  """{table: its version} for the dataset version of ``summary``."""
  return {schema.SLICES_DIR: summary[VERSION], **summary[REPORT_VERSIONS]}


def file_actions(path: str, data: bytes):
  """(``'add'`` or ``'remove'``, data file path relative to the table) of each
  file action in one commit file's bytes, in order.

  Raises:
    DatasetError: a line is not JSON.
  """
  from urllib.parse import unquote

  for line in data.splitlines():
    try:
      action = json.loads(line)
    except ValueError as e:
      raise DatasetError(f'{path} is unreadable: {e}') from None
    for kind in ('add', 'remove'):
      if isinstance(action, dict) and kind in action:
        found = action[kind]
        name = found.get('path') if isinstance(found, dict) else None
        if not isinstance(name, str):
          raise DatasetError(f'{path} is unreadable: a {kind} action without a path')
        yield kind, unquote(name)


def table_files(output: str, table: str, version: int) -> set[str]:
  """The data files of ``table`` at ``version``, relative to the table, by
  replaying its commits' add and remove actions (the log is kept whole:
  ``delta.enableExpiredLogCleanup`` is off). Pure Python, not deltalake:
  deltalake's runtime panics in a forked process, such as a DataLoader
  worker."""
  files: set[str] = set()
  for v in range(version + 1):
    path = log_path(output, table, v)
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except FileNotFoundError:
      raise DatasetError(
        f'{path} not found: the log of {table} is incomplete'
      ) from None
    except OSError as e:
      raise DatasetError(f'{path} is unreadable: {e}') from None
    for kind, name in file_actions(path, data):
      if kind == 'add':
        files.add(name)
      else:
        files.discard(name)
  return files


def version_files(output: str, summary: dict) -> set[str]:
  """The data files of each table at the versions ``summary`` names, as
  paths relative to ``output`` (what Delta readers read)."""
  return {
    f'{table}/{name}'
    for table, version in table_versions(summary).items()
    for name in table_files(output, table, version)
  }


def history(output: str) -> list[dict]:
  """Every version's run record, oldest first, each with its commit time
  (``timestamp``, ms since the epoch). An altered record is listed with
  ``error`` instead."""
  found = []
  for version in versions(output):
    info = commit_info(output, schema.SLICES_DIR, version)
    try:
      entry = record(output, version)
    except DatasetError as e:
      entry = {VERSION: version, 'error': str(e)}
    found.append({**entry, 'timestamp': info.get('timestamp')})
  return found
