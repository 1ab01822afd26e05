"""Process-wide tweaks: those a decoding worker makes once, in
``DoFn.setup``, and the launcher's, made before it starts anything.

Each is one named function whose docstring says what it buys, as measured in
BENCHMARKS.md ("Process-wide tweaks"); one that stops paying there goes (as
gc.freeze() did).
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


def _mallopt():
  """glibc's mallopt, or None where there is no glibc (musl, macOS)."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return None
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  return mallopt


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
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
  memory, for a few per cent less CPU (BENCHMARKS.md, "Figures behind the code").
  The heap then stays at the run's peak instead of shrinking, which the
  memory benchmark covers.

  Returns False where there is no glibc (musl, macOS): nothing to tune.
  """
  if not enabled('malloc') or (mallopt := _mallopt()) is None:
    return False
  done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(
    _M_TRIM_THRESHOLD, TRIM_THRESHOLD
  )
  if not done:
    _LOG.debug('mallopt refused the thresholds')
  return bool(done)


ARENA_VARIABLE = 'MALLOC_ARENA_MAX'
ARENAS = 2


def limit_arenas() -> bool:
  """Caps glibc's malloc arenas at ARENAS, in this process and, through
  MALLOC_ARENA_MAX, in every process it starts (worker processes, decoder
  children). A value the user set is left as it is.

  glibc gives each thread that meets contention an arena of its own, up to 8
  per core, and an arena keeps what was freed in it. The DirectRunner's
  runner moves its workers' data with a pool of gRPC threads, and each
  worker writes from a thread of its own, so their memory grew with the run:
  at 115,000 slices with 2 worker processes the whole process tree peaked
  at 1,586 MiB, 1,266 MiB with 2 arenas, at the same speed (bench/scale.py,
  BENCHMARKS.md). Call it before the process starts any thread.

  Returns False where there is no glibc, or the user chose the value.
  """
  if not enabled('arenas') or ARENA_VARIABLE in os.environ:
    return False
  os.environ[ARENA_VARIABLE] = str(ARENAS)
  mallopt = _mallopt()
  return mallopt is not None and bool(mallopt(_M_ARENA_MAX, ARENAS))
