"""The pseudonymisation key and the id map: files the user keeps apart.

``cardiac-mri keygen FILE`` writes a new key: 32 random bytes, readable by
its owner only. ``--pseudonymize-key-file FILE`` reads one back
(:func:`load`), refusing a file that every user may read or a key shorter
than 32 bytes. ``--id-map PATH`` receives the table that maps each original
id, name and UID to its pseudonym (:func:`assemble_id_map`): with the key,
it is what re-identifies the dataset, so neither ever goes into --output.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import shutil
import stat
import sys
from collections.abc import Sequence

from transforms.contract.errors import UsageError
from transforms.contract.pseudonyms import KEY_BYTES, Entry, Pseudonyms

ID_MAP_HEADER = Entry._fields  # kind, original, pseudonym


def generate(path: str) -> None:
  """Writes a new random key to ``path`` (mode 0600); never replaces a file.

  Raises:
    UsageError: ``path`` exists or cannot be created.
  """
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except FileExistsError:
    raise UsageError(f'{path} exists: a key is never overwritten') from None
  except OSError as e:
    raise UsageError(f'cannot create {path}: {e.strerror}') from None
  with os.fdopen(fd, 'wb') as f:
    f.write(os.urandom(KEY_BYTES))


def load(path: str) -> Pseudonyms:
  """The pseudonyms of the key in ``path`` (its raw bytes, all of them).

  Raises:
    UsageError: the file is missing, unreadable, readable or writable by
      every user, or holds fewer than 32 bytes.
  """
  flag = '--pseudonymize-key-file'
  try:
    with open(path, 'rb') as f:
      mode = os.fstat(f.fileno()).st_mode
      key = f.read(1 << 16)
  except OSError as e:
    raise UsageError(f'{flag} {path}: {e.strerror}') from None
  if not stat.S_ISREG(mode):
    raise UsageError(f'{flag} {path} is not a regular file')
  if mode & (stat.S_IROTH | stat.S_IWOTH):
    raise UsageError(
      f'{flag} {path} may be read or written by every user: chmod 600 it '
      '(and keep it away from the dataset)'
    )
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


def assemble_id_map(parts: str, id_map: str) -> int:
  """Joins the job's parts (``parts``/*.csv) into ``id_map`` (a CSV with a
  header; mode 0600, replaced atomically) and removes ``parts``; returns
  the number of rows."""
  staged = f'{id_map}.tmp-{os.getpid()}'
  rows = 0
  fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  with os.fdopen(fd, 'w', encoding='utf-8', newline='') as out:
    out.write(','.join(ID_MAP_HEADER) + '\n')
    for part in sorted(glob.glob(os.path.join(glob.escape(parts), '*.csv'))):
      with open(part, encoding='utf-8', newline='') as f:
        for line in f:
          out.write(line)
          rows += line.endswith('\n')
    out.flush()
    os.fsync(out.fileno())
  os.replace(staged, id_map)
  shutil.rmtree(parts, ignore_errors=True)
  return rows


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
  print(f'wrote a {KEY_BYTES}-byte key to {args.file} (mode 600)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
