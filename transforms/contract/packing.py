"""Records packed into one bytes value where they wait in a shuffle.

A runner holds what crosses a shuffle (a GroupByKey, CoGroupByKey or
Reshuffle) until the stage after it runs; the DirectRunner holds it in its
launcher, an object per element, and every element costs a runner its own
bookkeeping and transport. Sent as records, a listing's DicomFiles, a
chunk's SliceTasks and the slices' identities made several elements per
file. Packed into one bytes value per folder, chunk or bucket, they make a
few per patient, whatever its size (BENCHMARKS.md, issue 16 target 4).

Packed records are compressed (zlib, level 1): they are mostly paths and
ids that repeat within a folder, chunk or bucket, so they shrink to about a
third for a few microseconds of CPU a slice. The DirectRunner holds a
shuffle's input until the stage after it runs, and builds a second copy when
it hands the grouped values on, so what a shuffle holds shows in the peak
memory (BENCHMARKS.md, "Figures behind the code").

Only the pipeline's own records are packed, by one stage for the next; no
input file's bytes are ever unpickled.
"""

from __future__ import annotations

import pickle
import zlib
from typing import Any

_LEVEL = 1  # zlib's fastest: higher levels save little more here


def pack(records: Any) -> bytes:
  """``records`` (built of tuples, NamedTuples, str, int, None) as bytes."""
  return zlib.compress(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL), _LEVEL)


def unpack(data: bytes) -> Any:
  """What :func:`pack` packed."""
  return pickle.loads(zlib.decompress(data))  # noqa: S301 (our own records, above)
