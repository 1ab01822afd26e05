"""The pseudonymisation key and the id map: files the user keeps apart.

``cardiac-mri keygen FILE`` writes a new key: 32 random bytes, readable by
its owner only. ``--pseudonymize-key-file FILE`` reads one back
(:func:`load`), refusing a file that its group or every user may read or
write, a link, or a key shorter than 32 bytes. ``--id-map PATH`` receives the table that
maps each original id, name and UID to its pseudonym: with the key, it is
what re-identifies the dataset, so neither ever goes into --output.

A run holds the id map (``lock_path``) from before its job starts until the
map is in place: the job writes its parts into a folder of the run's own
(``make_parts``, mode 0700, each part 0600 from its first byte), the
launcher joins them into a staged file before the dataset is published
(``stage_id_map``) and puts it in place after (``put_id_map``: a new map
never replaces one that appeared meanwhile, and is then kept beside it
under a name made for it). The parts are removed however the run ends, and
the staged file too unless the dataset was published (then it may be the
only copy of the map); a killed run's are removed by the next run of the
same map (``remove_leftovers``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import logging
import os
import re
import secrets
import sys
from collections.abc import Sequence
from typing import NamedTuple

from beam_pipeline.tools import pipe
from transforms.contract import local_files
from transforms.contract.errors import UsageError
from transforms.contract.pseudonyms import KEY_BYTES, Entry, Pseudonyms

_LOG = logging.getLogger(__name__)

ID_MAP_HEADER = Entry._fields  # kind, original, pseudonym


def generate(path: str) -> None:
  """Writes a new random key to ``path`` (mode 0600); never replaces a file.

  Raises:
    UsageError: ``path`` exists or cannot be created.
  """
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
  except FileExistsError:
    raise UsageError(f'{path} exists: a key is never overwritten') from None
  except OSError as e:
    raise UsageError(f'cannot create {path}: {e.strerror}') from None
  with os.fdopen(fd, 'wb') as f:
    f.write(os.urandom(KEY_BYTES))


def load(path: str) -> Pseudonyms:
  """The pseudonyms of the key in ``path`` (its raw bytes, all of them).

  Raises:
    UsageError: the file is missing, unreadable, a link or not a regular
      file, readable or writable by its group or every user, another
      user's, or holds fewer than 32 bytes (``local_files.read_private``).
  """
  flag = '--pseudonymize-key-file'
  key = local_files.read_private(path, flag)
  if len(key) < KEY_BYTES:
    raise UsageError(
      f'{flag} {path} holds {len(key)} bytes; a key has at least {KEY_BYTES} '
      '(make one with `cardiac-mri keygen FILE`)'
    )
  return Pseudonyms(key)


def entry_line(entry: Entry) -> str:
  """One id-map row as a CSV line (no line end): any name is quoted as CSV
  quotes it, so commas, quotes and line breaks in a name survive."""
  out = io.StringIO()
  csv.writer(out, lineterminator='').writerow(entry)
  return out.getvalue()


def parts_folder(id_map: str, run_id: str) -> str:
  """Where the job writes the id map's parts, beside ``id_map``."""
  return f'{id_map}.parts-{run_id}'


def lock_path(id_map: str) -> str:
  """The lock a run holds on ``id_map`` (``lock.hold_file``) while it runs."""
  return f'{id_map}.lock'


def _staged_path(id_map: str, run_id: str) -> str:
  return f'{id_map}.tmp-{run_id}'


def _kept_path(id_map: str, run_id: str) -> str:
  return f'{id_map}.{run_id}'


def check_id_map(id_map: str, overwrite: bool) -> None:
  """Raises UsageError if ``id_map`` is something no run of this pipeline
  made (a link, a FIFO, a folder, a file of several links: refused even with
  --overwrite), or a map already there and ``overwrite`` is False."""
  what = local_files.planted(id_map)
  if what is not None:
    raise UsageError(
      f'--id-map {id_map} is {what}, not an id map this pipeline wrote; '
      'remove it, or choose another --id-map'
    )
  if os.path.lexists(id_map) and not overwrite:
    raise UsageError(f'--id-map {id_map} exists: add --overwrite to replace it')


# A run id (launch.lock.new_run_id), or the pid an older release named its
# staged map by: only names of this shape are a dead run's, so the files of
# another map whose name starts with this one's are never taken for them.
_RUN_ID = re.compile(r'\d{8}-\d{6}-[0-9a-f]{8}|\d+')


def remove_leftovers(id_map: str, run_id: str) -> list[str]:
  """Removes the parts folders and staged maps that runs of ``id_map`` no
  longer running left beside it, and anything at this run's own names
  (call it holding ``lock_path(id_map)``: every run that is running holds
  it); returns them."""
  folder, name = os.path.split(id_map)
  left = [parts_folder(id_map, run_id), _staged_path(id_map, run_id)]
  for entry in sorted(os.listdir(folder or '.')):
    for kind in ('.parts-', '.tmp-'):
      if entry.startswith(name + kind) and _RUN_ID.fullmatch(entry[len(name + kind) :]):
        left.append(os.path.join(folder, entry))
  left = sorted({path for path in left if os.path.lexists(path)})
  for path in left:
    _LOG.warning(
      'removing %s: left by a run of this --id-map that is no longer running', path
    )
    local_files.remove(path)
  return left


def make_parts(id_map: str, run_id: str) -> str:
  """Makes the job's parts folder (mode 0700, made here or not at all);
  returns it.

  Raises:
    UsageError: something is already there.
  """
  parts = parts_folder(id_map, run_id)
  try:
    os.mkdir(parts, 0o700)
  except FileExistsError:
    raise UsageError(
      f'--id-map {id_map}: {parts} exists, made by something else than this '
      'run; remove it'
    ) from None
  return parts


def remove_run_files(id_map: str, run_id: str, published: bool = False) -> None:
  """Removes the run's parts folder and staged map, whatever state they
  are in (the map itself, once in place, stays).

  Args:
    published: the run's dataset was published. Its staged map is then
      never removed: if it is still there, ``put_id_map`` could not put it
      anywhere else (or was never reached), and it is the only copy.
  """
  local_files.remove(parts_folder(id_map, run_id))
  if not published:
    local_files.remove(_staged_path(id_map, run_id))


class StagedMap(NamedTuple):
  """An id map written whole beside its place, waiting for ``put_id_map``."""

  id_map: str
  run_id: str
  rows: int

  @property
  def path(self) -> str:
    """Where the staged map is until ``put_id_map`` moves it."""
    return _staged_path(self.id_map, self.run_id)


def stage_id_map(parts: str, id_map: str, run_id: str, overwrite: bool) -> StagedMap:
  """Joins the job's parts (``parts``/*.csv) into a new file beside
  ``id_map`` (a CSV with a header; mode 0600 from its first byte, synced),
  before the dataset is published.

  Raises:
    UsageError: without ``overwrite``, ``id_map`` was made while the run
      ran (not by a run of this pipeline: each holds ``lock_path``); or
      something other than an id map is there. Nothing is published then.
  """
  try:
    check_id_map(id_map, overwrite)
  except UsageError as e:
    raise UsageError(
      f'{e} (it appeared while this run ran, made by something else than a '
      f'run of this pipeline, which holds {lock_path(id_map)}); nothing of '
      'this run was published'
    ) from None
  rows = 0
  with local_files.create_new(_staged_path(id_map, run_id), 0o600) as out:
    out.write((','.join(ID_MAP_HEADER) + '\n').encode())
    for part in sorted(glob.glob(os.path.join(glob.escape(parts), '*.csv'))):
      with open(part, 'rb') as f:
        for line in f:
          out.write(line)
          rows += line.endswith(b'\n')
    out.flush()
    os.fsync(out.fileno())
  return StagedMap(id_map, run_id, rows)


# Names tried for a map kept beside --id-map after its own: drawn at random,
# so no one who learnt the run id can take them all first.
_KEPT_TRIES = 5


def put_id_map(staged: StagedMap, overwrite: bool) -> str:
  """Puts the staged map in its place (with ``overwrite`` replacing what is
  there, a link itself and not its target; without, only where nothing is:
  a hard link, which fails if the name is taken); returns what the summary
  says of it. Never raises: the dataset is published by then, and this map
  is what re-identifies it.

  A map that appeared in the instant since ``stage_id_map`` looked is not
  replaced: this run's map is kept beside it, under a new name made here
  (``PATH.<run id>``, or if that is taken too ``PATH.<run id>-<random>``),
  and the summary and a warning say where. If no name can be made, the map
  stays where it was staged (``StagedMap.path``), and they say that.
  """
  id_map = staged.id_map
  said = f'{staged.rows} rows; keep it apart from the dataset'
  try:
    with local_files.Folder.open(os.path.dirname(id_map)) as where:
      kept, reason = _put(where, staged, overwrite)
  except Exception as e:  # the folder itself: the map stays staged
    kept, reason = None, _why(e)
  if kept == id_map:
    return f'{id_map} ({said})'
  if kept is None:
    kept = staged.path
    reason += (
      f'; move {kept} away before the next run of this --id-map, which '
      'removes it as a leftover'
    )
  _LOG.warning(
    "--id-map %s was not replaced (%s): this run's map is %s", id_map, reason, kept
  )
  return f'{kept} ({said}; NOT at {id_map}: {reason})'


def _put(
  where: local_files.Folder, staged: StagedMap, overwrite: bool
) -> tuple[str | None, str]:
  """(where the staged map now is, or None if it stayed staged; why it is
  not at its place, '' when it is): ``put_id_map`` in the map's folder."""
  id_map, run_id = staged.id_map, staged.run_id
  staged_name = os.path.basename(staged.path)
  try:
    where.put(staged_name, os.path.basename(id_map), replace=overwrite)
    return id_map, ''
  except OSError as e:
    reason = 'it appeared meanwhile' if isinstance(e, FileExistsError) else _why(e)
  names = [_kept_path(id_map, run_id)]
  names += [f'{names[0]}-{secrets.token_hex(8)}' for _ in range(_KEPT_TRIES)]
  for kept in names:
    try:  # made here or not at all: a hard link (or an exclusive copy)
      where.put(staged_name, os.path.basename(kept), replace=False)
      return kept, reason
    except FileExistsError:
      continue
    except OSError as e:
      return None, f'{reason}; keeping it beside failed: {_why(e)}'
  return None, f'{reason}; {len(names)} names beside it were taken too'


def _why(e: BaseException) -> str:
  return getattr(e, 'strerror', None) or str(e) or type(e).__name__


def read_id_map(path: str) -> list[Entry]:
  """The rows of an id map (for tests and tools)."""
  with open(path, encoding='utf-8', newline='') as f:
    reader = csv.reader(f)
    header = next(reader)
    if tuple(header) != ID_MAP_HEADER:
      raise ValueError(f'{path}: not an id map (header {header})')
    return [Entry(*row) for row in reader]


def main(argv: Sequence[str] | None = None) -> int:
  """``cardiac-mri keygen FILE``."""
  parser = argparse.ArgumentParser(
    prog='cardiac-mri keygen',
    description='Write a new pseudonymisation key (32 random bytes, mode 600) '
    'for --pseudonymize-key-file. Keep it apart from the dataset: with the '
    'key, pseudonyms can be checked against guessed ids.',
  )
  parser.add_argument('file', help='the key file to create (never overwritten)')
  args = parser.parse_args(argv)
  try:
    generate(args.file)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  pipe.out(f'wrote a {KEY_BYTES}-byte key to {args.file} (mode 600)')
  return 0


if __name__ == '__main__':
  sys.exit(pipe.run(main))
