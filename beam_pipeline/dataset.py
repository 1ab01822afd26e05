"""Reading the pipeline's output back: pure pyarrow and numpy, no Beam.

ds = open_dataset('output')
for row in ds.to_table(filter=pc.field('patient_id') == 'SCD0000101').to_pylist():
    image = image_of(row)                  # (rows, columns) numpy array
    inner = mask_of(row, 'i')              # bool array, or None
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from beam_pipeline import schema as s


def _folder(output: str, name: str) -> str:
  return os.path.join(output, name)


def open_dataset(output: str) -> pads.Dataset:
  """The slices of a pipeline output folder, as a pyarrow Dataset.

  Raises:
    FileNotFoundError: ``output`` holds no slices folder.
  """
  folder = _folder(output, s.SLICES_DIR)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{folder} not found: is {output} a pipeline output?')
  return pads.dataset(folder, format='parquet', schema=s.SLICE_SCHEMA)


def _read_report(output: str, name: str, schema: pa.Schema) -> pa.Table:
  folder = _folder(output, name)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{folder} not found: is {output} a pipeline output?')
  files = sorted(
    os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.parquet')
  )
  if not files:
    return schema.empty_table()
  return pa.concat_tables(pq.read_table(f, schema=schema) for f in files)


def read_reconciliation(output: str) -> pa.Table:
  """The reconciliation report (patient_id, original_id, status, detail)."""
  return _read_report(output, s.RECONCILIATION_DIR, s.RECONCILIATION_SCHEMA)


def read_errors(output: str) -> pa.Table:
  """The dead-letter table (patient_id, path, stage, error)."""
  return _read_report(output, s.ERRORS_DIR, s.ERROR_SCHEMA)


def image_of(row: dict, rescale: bool = False) -> np.ndarray:
  """A row's image as stored, shape (rows, columns[, samples]).

  Args:
    row: a slice row (a dict, e.g. from ``Table.to_pylist()``).
    rescale: apply ``rescale_slope`` and ``rescale_intercept`` (1 and 0 when
      absent), returning float64.
  """
  shape = (row['rows'], row['columns'])
  if row['samples_per_pixel'] > 1:
    shape += (row['samples_per_pixel'],)
  dtype = np.dtype(row['pixel_dtype']).newbyteorder('<')
  image = np.frombuffer(row['image'], dtype=dtype).reshape(shape)
  if not rescale:
    return image
  slope = row['rescale_slope'] if row['rescale_slope'] is not None else 1.0
  intercept = row['rescale_intercept'] if row['rescale_intercept'] is not None else 0.0
  return image.astype(np.float64) * slope + intercept


def unpack_mask(data: bytes, rows: int, columns: int) -> np.ndarray:
  """Inverse of ``numpy.packbits``: the (rows, columns) boolean mask."""
  bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=rows * columns)
  return bits.astype(bool).reshape(rows, columns)


def mask_of(row: dict, kind: str) -> np.ndarray | None:
  """A row's ``i`` (inner) or ``o`` (outer) mask, or None if it has none."""
  data = row[f'{kind}_mask']
  if data is None:
    return None
  return unpack_mask(data, row['rows'], row['columns'])
