"""Progress count files: how worker processes tell the launcher what is done.

On a local runner the launcher makes a progress folder; each worker process
keeps one file there, ``<pid>.count``, holding ``<slices> <patients>``, which
it replaces atomically. The launcher sums them (``beam_pipeline.progress``).
"""

from __future__ import annotations

import os

SUFFIX = '.count'


def write_counts(folder: str, slices: int, patients: int) -> None:
  """Replaces this process's count file in ``folder`` (raises OSError)."""
  path = os.path.join(folder, f'{os.getpid()}{SUFFIX}')
  with open(path + '.tmp', 'w') as f:
    f.write(f'{slices} {patients}\n')
  os.replace(path + '.tmp', path)


def read_counts(folder: str) -> tuple[int, int]:
  """(slices, patients) done, summed over the count files in ``folder``."""
  slices = patients = 0
  try:
    names = os.listdir(folder)
  except OSError:
    return 0, 0
  for name in names:
    if not name.endswith(SUFFIX):
      continue
    try:
      with open(os.path.join(folder, name)) as f:
        done_slices, done_patients = f.read().split()
    except (OSError, ValueError):  # replaced just now
      continue
    slices += int(done_slices)
    patients += int(done_patients)
  return slices, patients
