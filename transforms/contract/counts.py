"""Progress count files: how worker processes tell the launcher what is done.

On a local runner the launcher makes a progress folder; each worker process
keeps one file there, ``<pid>.count``, holding one fixed-size record,
``<slices> <patients> <crc32>``, which it overwrites in place with a single
``pwrite``. The launcher sums them (``beam_pipeline.launch.progress``); a record read
while it was being written fails its CRC, and the reader then uses that
file's last good record. (A new file renamed over the old one would be
atomic, but ext4 flushes a file renamed over another before the rename
returns, which cost a run a measurable share of its time:
(BENCHMARKS.md, "Figures behind the code").)
"""

from __future__ import annotations

import os
import zlib

SUFFIX = '.count'


def record(slices: int, patients: int) -> bytes:
  """The fixed-size record of a count file."""
  body = f'{slices:20d} {patients:20d}'
  return f'{body} {zlib.crc32(body.encode()):08x}\n'.encode()


def parse(data: bytes) -> tuple[int, int] | None:
  """(slices, patients) of a record; None when it is torn or not one."""
  body, _, crc = data.rstrip(b'\n').rpartition(b' ')
  try:
    if int(crc, 16) != zlib.crc32(body):
      return None
    slices, patients = body.split()
    return int(slices), int(patients)
  except ValueError:
    return None


def write_counts(folder: str, slices: int, patients: int) -> None:
  """Overwrites this process's count file in ``folder`` (raises OSError)."""
  path = os.path.join(folder, f'{os.getpid()}{SUFFIX}')
  fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
  try:
    os.pwrite(fd, record(slices, patients), 0)
  finally:
    os.close(fd)


def read_counts(
  folder: str, last: dict[str, tuple[int, int]] | None = None
) -> tuple[int, int]:
  """(slices, patients) done, summed over the count files in ``folder``.

  ``last`` keeps each file's last good record between calls: a file caught
  mid-write counts with that record instead of dropping out of the sum.
  """
  last = {} if last is None else last
  slices = patients = 0
  try:
    names = os.listdir(folder)
  except OSError:
    return 0, 0
  for name in names:
    if not name.endswith(SUFFIX):
      continue
    try:
      with open(os.path.join(folder, name), 'rb') as f:
        counted = parse(f.read())
    except OSError:
      counted = None
    if counted is not None:
      last[name] = counted
    counted = last.get(name)
    if counted is not None:
      slices += counted[0]
      patients += counted[1]
  return slices, patients
