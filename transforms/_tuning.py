"""Process-wide tweaks a decoding worker makes once, in ``DoFn.setup``.

Each is one named function whose docstring says what it buys, as measured in
BENCHMARKS.md ("Process-wide tweaks"); one that stops paying there goes (as
gc.freeze() did: within 1 % at 23,000 slices).
``bench/run.py --tweaks`` measures each by leaving it off through the
CARDIAC_MRI_TWEAKS_OFF environment variable (a benchmark knob, e.g.
``malloc,direct``; every process of a run reads it).
"""

from __future__ import annotations

import ctypes
import logging
import os

_LOG = logging.getLogger(__name__)

TWEAKS_OFF = 'CARDIAC_MRI_TWEAKS_OFF'


def enabled(tweak: str) -> bool:
  """False when the benchmark knob leaves ``tweak`` off (see module docstring)."""
  return tweak not in os.environ.get(TWEAKS_OFF, '').split(',')


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit; larger blocks are still mmap()ed.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024


def keep_freed_memory() -> bool:
  """Lets glibc reuse freed slice buffers instead of faulting in new pages.

  Every slice allocates a few buffers of its own size (file bytes, pixels, Arrow
  and Parquet pages). By default glibc serves blocks over 128 KiB with fresh
  mmap()s and trims the heap as soon as its top is free, so each slice's
  buffers come back as new pages, and every new page costs a page fault and a
  zeroed page. Raising both thresholds lets the next slice reuse the same
  memory. Buys (BENCHMARKS.md, 23,000 slices, same run): 3 % less CPU
  in-process and 5 % with 2 worker processes. The heap then stays at the
  run's peak instead of shrinking, which the memory benchmark covers.

  Returns False where there is no glibc (musl, macOS): nothing to tune.
  """
  if not enabled('malloc'):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(
    _M_TRIM_THRESHOLD, TRIM_THRESHOLD
  )
  if not done:
    _LOG.debug('mallopt refused the thresholds')
  return bool(done)
