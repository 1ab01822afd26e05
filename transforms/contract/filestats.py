"""A Parquet file's statistics as a Delta Lake ``add`` action carries them.

Delta readers (delta-rs, Polars, Spark, DuckDB's delta extension) skip the
files whose statistics rule a filter out: ``numRecords`` and, per top-level
column, ``nullCount`` and ``minValues``/``maxValues``. They are computed here
from the footer the writer has just written (no second read of the file), for
the columns Delta keeps statistics of: integers, floating point numbers and
strings; lists, binaries and booleans get a null count only, or nothing.

Pure: no I/O.
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq

# Parquet physical types whose min/max Delta readers compare.
_ORDERED = {'INT32', 'INT64', 'FLOAT', 'DOUBLE', 'BYTE_ARRAY'}


def _value(value):
  """A statistic as JSON holds it (None: not representable)."""
  if isinstance(value, bytes):
    try:
      return value.decode()
    except UnicodeDecodeError:
      return None
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def of_footer(metadata: pq.FileMetaData) -> str:
  """The ``stats`` string of a Delta ``add`` action for the file whose footer
  is ``metadata``."""
  minimum: dict = {}
  maximum: dict = {}
  nulls: dict = {}
  if metadata.num_row_groups:
    first = metadata.row_group(0)
    for c in range(first.num_columns):
      name = first.column(c).path_in_schema
      if '.' in name:  # a nested leaf (a list's elements): no statistics
        continue
      chunks = [metadata.row_group(g).column(c) for g in range(metadata.num_row_groups)]
      stats = [chunk.statistics for chunk in chunks]
      if any(s is None or not s.has_null_count for s in stats):
        continue
      nulls[name] = sum(s.null_count for s in stats)
      typed = first.column(c).physical_type in _ORDERED
      logical = str(stats[0].logical_type)
      if not typed or (
        first.column(c).physical_type == 'BYTE_ARRAY' and logical != 'String'
      ):
        continue
      ranged = [s for s in stats if s.num_values > 0]  # not all null
      if not ranged or not all(s.has_min_max for s in ranged):
        continue
      low = _value(min(s.min for s in ranged))
      high = _value(max(s.max for s in ranged))
      if low is not None and high is not None:
        minimum[name] = low
        maximum[name] = high
  return json.dumps(
    {
      'numRecords': metadata.num_rows,
      'minValues': minimum,
      'maxValues': maximum,
      'nullCount': nulls,
    },
    separators=(',', ':'),
  )
