"""Other readers read the dataset with no code of ours: DuckDB and Polars
(their own Parquet readers) and pandas, for every --image-codec."""

import os

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pytest

from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from tests.helpers import reference_mask
from transforms import settings
from transforms.contract import schema


def _expected(manifest, rows, columns):
  """{(patient_id, slice_index): (image bytes, i mask or None)}."""
  want = {}
  for (pid, k), expected in manifest.slices.items():
    image = sample.expected_image(pid, k, rows, columns).astype('<i2').tobytes()
    vertices = expected.i_vertices
    mask = None if vertices is None else reference_mask(vertices, rows, columns)
    want[pid, k] = (image, mask)
  return want


@pytest.mark.parametrize('codec', settings.IMAGE_CODECS)
def test_duckdb_polars_and_pandas_read_every_slice(codec, tmp_path):
  rows, columns = 20, 28
  root, out = str(tmp_path / 'DATA'), str(tmp_path / 'OUT')
  manifest = sample.make_tree(root, patients=2, slices=6, rows=rows, columns=columns)
  assert cli.main(['--input', root, '--output', out, '--image-codec', codec]) == 0
  shards = os.path.join(out, schema.SLICES_DIR, '*.parquet')
  want = _expected(manifest, rows, columns)
  query = f"SELECT patient_id, slice_index, image, i_mask FROM read_parquet('{shards}')"
  tables = {
    'duckdb': duckdb.sql(query).fetchall(),
    'polars': pl.read_parquet(shards)
    .select('patient_id', 'slice_index', 'image', 'i_mask')
    .rows(),
    'pandas': [
      tuple(r)
      for r in pd.read_parquet(os.path.join(out, schema.SLICES_DIR))[
        ['patient_id', 'slice_index', 'image', 'i_mask']
      ].itertuples(index=False)
    ],
  }
  for reader, got in tables.items():
    assert len(got) == len(want), reader
    for pid, k, image, packed in got:
      image_want, mask_want = want[pid, int(k)]
      assert bytes(image) == image_want, (reader, pid, k)
      if mask_want is None:
        assert packed is None, (reader, pid, k)
      else:
        bits = np.unpackbits(np.frombuffer(bytes(packed), np.uint8))
        mask = bits[: rows * columns].astype(bool).reshape(rows, columns)
        np.testing.assert_array_equal(mask, mask_want)


def test_small_columns_are_lz4_raw_for_every_reader(written):
  # pyarrow names both LZ4 codecs 'LZ4'; the Hadoop-framed one is deprecated
  # and not every reader takes it. DuckDB reads the codec from the footer.
  shards = os.path.join(written.out, schema.SLICES_DIR, '*.parquet')
  found = dict(
    duckdb.sql(
      'SELECT path_in_schema, list(DISTINCT compression) '
      f"FROM parquet_metadata('{shards}') GROUP BY path_in_schema"
    ).fetchall()
  )
  assert set(found) >= {'patient_id', 'slice_index', 'i_mask', 'image'}
  for column, codecs in found.items():
    top = column.split('.')[0]
    want = 'ZSTD' if top in ('image', 'i_mask', 'o_mask') else 'LZ4_RAW'
    assert codecs == [want], column
  frame = pl.read_parquet(shards, columns=['patient_id', 'pixel_spacing', 'qa_flags'])
  assert frame.height == sum(1 for _ in written.manifest.slices)
