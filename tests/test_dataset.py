"""The dataset reader: decoding, seeded shuffled batches, splits, projection."""

import os
import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from beam_pipeline import dataset
from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from tests.conftest import WRITTEN_SHAPE
from tests.helpers import expected_splits, reference_mask
from transforms.contract import splits


def _keys(batches):
  return [
    (pid, int(k))
    for b in batches
    for pid, k in zip(b['patient_id'], b['slice_index'], strict=True)
  ]


def test_every_slice_once_per_epoch_and_orders_are_seeded(written):
  out, manifest = written.out, written.manifest
  batches = list(dataset.iter_batches(out, batch_size=5, seed=1, epochs=2))
  keys = _keys(batches)
  n = len(manifest.slices)
  first, second = keys[:n], keys[n:]
  assert sorted(first) == sorted(manifest.slices) == sorted(second)
  assert first != second  # a new order each epoch
  assert keys == _keys(dataset.iter_batches(out, batch_size=5, seed=1, epochs=2))
  assert first != _keys(dataset.iter_batches(out, batch_size=5, seed=2))
  assert first != sorted(first)
  sizes = [len(b['patient_id']) for b in batches]
  assert sizes == [5] * (n // 5) + [n % 5] + [5] * (n // 5) + [n % 5]


def test_drop_last_and_bad_batch_size(written):
  out, manifest = written.out, written.manifest
  batches = list(dataset.iter_batches(out, batch_size=4, drop_last=True))
  assert {len(b['patient_id']) for b in batches} == {4}
  assert len(batches) == len(manifest.slices) // 4
  with pytest.raises(ValueError, match='batch_size'):
    next(dataset.iter_batches(out, batch_size=0))


def test_images_and_masks_are_stacked_exactly(written):
  out, manifest = written.out, written.manifest
  for batch in dataset.iter_batches(out, batch_size=7, seed=3):
    assert (
      batch['image'].shape[1:] == WRITTEN_SHAPE and batch['image'].dtype == np.int16
    )
    for i, key in enumerate(
      zip(batch['patient_id'], batch['slice_index'], strict=True)
    ):
      expected = manifest.slices[key[0], int(key[1])]
      np.testing.assert_array_equal(
        batch['image'][i],
        sample.expected_image(key[0], int(key[1]), *WRITTEN_SHAPE),
      )
      for kind in 'io':
        vertices = getattr(expected, f'{kind}_vertices')
        assert batch[f'has_{kind}_mask'][i] == (vertices is not None)
        want = (
          reference_mask(vertices, *WRITTEN_SHAPE)
          if vertices is not None
          else np.zeros(WRITTEN_SHAPE, bool)
        )
        np.testing.assert_array_equal(batch[f'{kind}_mask'][i], want)


def test_projection_labeled_only_and_split(written):
  out, manifest = written.out, written.manifest
  columns = ['patient_id', 'slice_index', 'split', 'i_mask']
  batches = list(
    dataset.iter_batches(out, batch_size=3, labeled_only=True, columns=columns)
  )
  assert set(batches[0]) == {*columns, 'has_i_mask'}
  assert sorted(_keys(batches)) == sorted(
    k for k, e in manifest.slices.items() if e.labeled
  )
  fractions = splits.parse_fractions(splits.DEFAULT_FRACTIONS)
  split_of = expected_splits((k[0] for k in manifest.slices), fractions)
  for name in splits.SPLITS:
    want = [k for k in manifest.slices if split_of[k[0]] == name]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      got = _keys(dataset.iter_batches(out, batch_size=8, split=name, columns=columns))
    assert sorted(got) == sorted(want)
    assert bool(caught) == (not want)  # a warning exactly when the split is empty


def _group_keys(out):
  """The (patient_id, slice_index) of each row group's rows, in file order."""
  found = []
  for path, index in dataset.row_groups(out):
    table = pq.ParquetFile(path).read_row_group(
      index, columns=['patient_id', 'slice_index', 'i_mask', 'o_mask']
    )
    found.append(table.to_pylist())
  return found


def test_shuffle_buffer_bounds_what_is_held(written):
  out = written.out
  # With a buffer of one row, rows leave in row-group order: each row group
  # comes out as one contiguous run.
  rows = [
    (r['patient_id'], r['slice_index'])
    for r in dataset.shuffled_rows(
      out, seed=5, shuffle_buffer=1, columns=['patient_id', 'slice_index']
    )
  ]
  for group in _group_keys(out):
    keys = [(r['patient_id'], r['slice_index']) for r in group]
    start = rows.index(keys[0])
    assert rows[start : start + len(keys)] == keys


def _labeled(row):
  return row['i_mask'] is not None or row['o_mask'] is not None


def test_labeled_slices_have_row_groups_of_their_own(written):
  out, manifest = written.out, written.manifest
  groups = _group_keys(out)
  labeled = [g for g in groups if any(_labeled(r) for r in g)]
  for group in groups:  # all labeled, or none
    assert len({_labeled(r) for r in group}) == 1
  # Gathered across chunks and patients (--chunk-size 4 here): at most one
  # short labeled row group per shard.
  shards = {path for path, _ in dataset.row_groups(out)}
  want = sum(e.labeled for e in manifest.slices.values())
  assert sum(len(g) for g in labeled) == want
  assert len(labeled) <= len(shards)
  assert len({r['patient_id'] for r in labeled[0]}) > 1


def test_a_labeled_read_opens_only_labeled_row_groups(written, monkeypatch):
  read = []
  original = pq.ParquetFile.read_row_group

  def recorded(self, index, *args, **kwargs):
    table = original(self, index, *args, **kwargs)
    read.append(table)
    return table

  monkeypatch.setattr(pq.ParquetFile, 'read_row_group', recorded)
  rows = list(dataset.shuffled_rows(written.out, seed=1, labeled_only=True))
  assert rows and all(_labeled(r) for r in rows)
  assert read and all(all(_labeled(r) for r in t.to_pylist()) for t in read)


def test_shards_partition_the_rows(written):
  out, manifest = written.out, written.manifest
  parts = [
    _keys(dataset.iter_batches(out, batch_size=4, seed=9, shard=(i, 3)))
    for i in range(3)
  ]
  assert sorted(sum(parts, [])) == sorted(manifest.slices)


def test_rescale_defaults_and_applies_slope_and_intercept():
  row = {
    'rows': 1,
    'columns': 3,
    'samples_per_pixel': 1,
    'pixel_dtype': 'int16',
    'image': np.array([[0, 10, -5]], '<i2').tobytes(),
    'rescale_slope': None,
    'rescale_intercept': None,
  }
  np.testing.assert_array_equal(
    dataset.image_of(row, rescale=True), [[0.0, 10.0, -5.0]]
  )
  row.update(rescale_slope=2.0, rescale_intercept=-100.0)
  np.testing.assert_array_equal(
    dataset.image_of(row, rescale=True), [[-100.0, -80.0, -110.0]]
  )
  assert dataset.image_of(row).dtype == np.dtype('<i2')


def test_missing_output_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='pipeline output'):
    dataset.open_dataset(str(tmp_path))


def _assert_batches_hold_the_rows(out, batch_size, **selection):
  """iter_batches builds each batch column by column; the same order's rows,
  one dict at a time (shuffled_rows), say what every entry must be."""
  batches = list(dataset.iter_batches(out, batch_size, seed=7, **selection))
  assert batches
  rows = iter(dataset.shuffled_rows(out, seed=7, **selection))
  mixed = False
  for batch in batches:
    images = batch['image']
    mixed |= isinstance(images, list)
    for i in range(len(batch['slice_index'])):
      row = next(rows)
      want = dataset.image_of(row)
      assert images[i].dtype == want.dtype
      np.testing.assert_array_equal(images[i], want)
      for kind in 'io':
        mask = dataset.mask_of(row, kind)
        assert batch[f'has_{kind}_mask'][i] == (mask is not None)
        if mask is None:
          assert not np.any(batch[f'{kind}_mask'][i])
        else:
          np.testing.assert_array_equal(batch[f'{kind}_mask'][i], mask)
      for name, value in row.items():
        if name not in ('image', 'i_mask', 'o_mask'):
          got = batch[name][i]
          assert (got.tolist() if isinstance(got, np.ndarray) else got) == value, name
  assert next(rows, None) is None
  return mixed


def test_batches_hold_exactly_the_rows(written):
  assert not _assert_batches_hold_the_rows(written.out, 7)
  assert not _assert_batches_hold_the_rows(written.out, 3, labeled_only=True)
  assert not _assert_batches_hold_the_rows(written.out, 5, shuffle_buffer=4)


def test_slices_of_several_sizes_come_as_lists(tmp_path):
  # Two generated trees of different image sizes, merged into one.
  root, other = str(tmp_path / 'DATA'), str(tmp_path / 'OTHER')
  sample.make_tree(root, patients=2, slices=6, rows=20, columns=24, contour_every=2)
  extra = sample.make_tree(other, patients=2, slices=6, rows=16, columns=12)
  with open(os.path.join(other, 'link.csv')) as f:
    links = f.read().splitlines()[1:]
  with open(os.path.join(root, 'link.csv'), 'a') as f:
    for line in links:
      pid, oid = line.split(',')
      shutil.copytree(f'{other}/dicoms/{pid}', f'{root}/dicoms/{pid}X')
      for name in os.listdir(f'{root}/dicoms/{pid}X'):  # not copies of tree A's
        path = f'{root}/dicoms/{pid}X/{name}'
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(path)
      shutil.copytree(f'{other}/contourfiles/{oid}', f'{root}/contourfiles/{oid}X')
      f.write(f'{pid}X,{oid}X\n')
  out = str(tmp_path / 'OUT')
  assert cli.main(['--input', root, '--output', out, '--chunk-size', '4']) == 0
  assert extra.slices  # both sizes are in the dataset
  assert _assert_batches_hold_the_rows(out, 24)
  assert _assert_batches_hold_the_rows(out, 5, labeled_only=True)


def test_odd_shapes_and_batches_kept_across_epochs(tmp_path):
  # 13 x 11 = 143 mask bits: packed masks end mid-byte, so they cannot be
  # unpacked joined. Every batch of two epochs is kept and checked after
  # both are read: image buffers are recycled between rows, and no batch
  # may share one.
  root, out = str(tmp_path / 'DATA'), str(tmp_path / 'OUT')
  manifest = sample.make_tree(root, patients=3, slices=8, rows=13, columns=11)
  assert cli.main(['--input', root, '--output', out, '--chunk-size', '3']) == 0
  batches = list(dataset.iter_batches(out, batch_size=5, seed=2, epochs=2))
  assert sum(len(b['slice_index']) for b in batches) == 2 * len(manifest.slices)
  labeled = 0
  for batch in batches:
    assert batch['image'].shape[1:] == (13, 11)
    for i, (pid, k) in enumerate(
      zip(batch['patient_id'], batch['slice_index'], strict=True)
    ):
      np.testing.assert_array_equal(
        batch['image'][i], sample.expected_image(pid, int(k), 13, 11)
      )
      for kind in 'io':
        vertices = getattr(manifest.slices[pid, int(k)], f'{kind}_vertices')
        labeled += vertices is not None
        want = (
          reference_mask(vertices, 13, 11)
          if vertices is not None
          else np.zeros((13, 11), bool)
        )
        np.testing.assert_array_equal(batch[f'{kind}_mask'][i], want)
  assert labeled
