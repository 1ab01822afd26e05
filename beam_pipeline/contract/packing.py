"""Records packed into one bytes value where they wait in a shuffle.

A runner holds what crosses a shuffle (a GroupByKey, CoGroupByKey or
Reshuffle) until the stage after it runs; the DirectRunner holds it in its
launcher, an object per element, and every element costs a runner its own
bookkeeping and transport. Sent as records, a listing's DicomFiles, a
chunk's SliceTasks and the slices' identities made several elements per
file. Packed into one bytes value per folder, chunk or bucket, they make a
few per patient, whatever its size (BENCHMARKS.md, issue 16 target 4).

Only the pipeline's own records are packed, by one stage for the next; no
input file's bytes are ever unpickled.
"""

from __future__ import annotations

import pickle
from typing import Any


def pack(records: Any) -> bytes:
  """``records`` (built of tuples, NamedTuples, str, int, None) as bytes."""
  return pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes) -> Any:
  """What :func:`pack` packed."""
  return pickle.loads(data)  # noqa: S301 (our own stage's records, see above)
