"""Process-wide tweaks a decoding worker makes once, in ``DoFn.setup``.

Each is one named function whose docstring says what it buys, as measured in
BENCHMARKS.md ("Process-wide tweaks"); one that stops paying there goes.
"""

from __future__ import annotations

import ctypes
import gc
import logging

_LOG = logging.getLogger(__name__)

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
  zeroed page (on the benchmark machine about 2 ms per MiB: a third of the run,
  BENCHMARKS.md). Raising both thresholds lets the next slice reuse the same
  memory. The heap then stays at the run's peak instead of shrinking, which the
  memory benchmark covers.

  Returns False where there is no glibc (musl, macOS): nothing to tune.
  """
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


def freeze_startup_objects() -> None:
  """Moves every object alive now out of the cyclic garbage collector's reach.

  The worker's long-lived objects (Beam, pydicom, pyarrow modules) never
  become garbage; once frozen, each later collection no longer walks them.
  """
  gc.freeze()
