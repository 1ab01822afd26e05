"""The training hand-off's reader options (issue 33): folds and patient
lists, the quality-flag filter, float channel-first images, label maps and
affines, and the transform hook."""

import os
import shutil

import numpy as np
import pydicom
import pytest

from beam_pipeline import dataset
from beam_pipeline.dataset import labels
from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from tests.conftest import WRITTEN_SHAPE
from tests.helpers import reference_mask
from transforms.contract import splits

_IDS = ['patient_id', 'slice_index']


def _keys(batches) -> list[tuple[str, int]]:
  return [
    (pid, int(k))
    for b in batches
    for pid, k in zip(b['patient_id'], b['slice_index'], strict=True)
  ]


def _patients(manifest) -> list[str]:
  return sorted({pid for pid, _ in manifest.slices})


# ---- folds and patient lists


@pytest.mark.parametrize('k', [2, 3, 6])
def test_folds_partition_the_patients_evenly_and_the_reader_follows_them(written, k):
  out, manifest = written.out, written.manifest
  dealt = dataset.folds(out, k)
  everyone = _patients(manifest)
  assert sorted(p for fold in dealt for p in fold) == everyone
  assert max(map(len, dealt)) - min(map(len, dealt)) <= 1 and all(dealt)
  assert dealt == dataset.folds(out, k)  # deterministic
  for i, fold in enumerate(dealt):
    held = _keys(
      dataset.iter_batches(out, 4, folds=k, fold=i, holdout=True, columns=_IDS)
    )
    rest = _keys(dataset.iter_batches(out, 4, folds=k, fold=i, columns=_IDS))
    assert sorted(held) == sorted(s for s in manifest.slices if s[0] in fold)
    assert sorted(rest) == sorted(s for s in manifest.slices if s[0] not in fold)


def test_folds_follow_the_hash_order_of_the_patients(written):
  out, manifest = written.out, written.manifest
  ranked = sorted(_patients(manifest), key=lambda p: (splits.patient_position(p), p))
  assert dataset.folds(out, 2) == [sorted(ranked[0::2]), sorted(ranked[1::2])]


def test_folds_within_a_split_and_their_errors(written):
  out = written.out
  rows = dataset.open_dataset(out).to_table(columns=['patient_id', 'split'])
  train = sorted({r['patient_id'] for r in rows.to_pylist() if r['split'] == 'train'})
  dealt = dataset.folds(out, 2, split='train')
  assert sorted(p for f in dealt for p in f) == train
  with pytest.raises(ValueError, match='cannot make'):
    dataset.folds(out, 7)
  with pytest.raises(ValueError, match='at least 2'):
    dataset.folds(out, 1)
  with pytest.raises(ValueError, match='go together'):
    next(dataset.iter_batches(out, 4, folds=3))
  with pytest.raises(ValueError, match='fold must be in 0..2'):
    next(dataset.iter_batches(out, 4, folds=3, fold=3))


def test_a_patient_list_reads_only_those_patients(written):
  out, manifest = written.out, written.manifest
  chosen = _patients(manifest)[1:3]
  got = _keys(dataset.iter_batches(out, 5, patients=chosen, columns=_IDS))
  assert sorted(got) == sorted(s for s in manifest.slices if s[0] in chosen)
  rows = list(dataset.shuffled_rows(out, 0, patients=chosen[:1], columns=_IDS))
  assert {r['patient_id'] for r in rows} == {chosen[0]}
  assert list(dataset.iter_batches(out, 5, patients=['nobody'])) == []
  with pytest.raises(ValueError, match='not one string'):
    next(dataset.iter_batches(out, 5, patients=chosen[0]))


# ---- views


def test_float_channel_first_images_label_maps_and_affines(written):
  out, manifest = written.out, written.manifest
  columns = [*_IDS, 'i_mask', 'o_mask']
  seen = 0
  for batch in dataset.iter_batches(
    out, 7, columns=columns, float_image=True, label_map=True, geometry=True
  ):
    n = len(batch['patient_id'])
    assert batch['image'].dtype == np.float32
    assert batch['image'].shape == (n, 1, *WRITTEN_SHAPE)
    assert batch['label'].shape == (n, 1, *WRITTEN_SHAPE)
    assert batch['affine'].shape == batch['affine_ras'].shape == (n, 4, 4)
    for k, (pid, index) in enumerate(
      zip(batch['patient_id'], batch['slice_index'], strict=True)
    ):
      e = manifest.slices[pid, int(index)]
      np.testing.assert_array_equal(
        batch['image'][k, 0], sample.expected_image(pid, int(index), *WRITTEN_SHAPE)
      )
      inner = reference_mask(e.i_vertices, *WRITTEN_SHAPE) if e.i_vertices else None
      outer = reference_mask(e.o_vertices, *WRITTEN_SHAPE) if e.o_vertices else None
      want = np.zeros(WRITTEN_SHAPE, np.uint8)
      if outer is not None:
        want[outer] = 2
      if inner is not None:
        want[inner] = 1
      np.testing.assert_array_equal(batch['label'][k, 0], want)
      _check_affine(
        os.path.join(manifest.root, 'dicoms', pid, f'{int(index)}.dcm'),
        batch['affine'][k],
        batch['affine_ras'][k],
      )
      seen += 1
  assert seen == len(manifest.slices)


def _check_affine(path, affine, affine_ras):
  """Each corner pixel's centre lands where the DICOM header puts it."""
  ds = pydicom.dcmread(path)
  origin = np.array(ds.ImagePositionPatient, float)
  row_cos = np.array(ds.ImageOrientationPatient[:3], float)
  col_cos = np.array(ds.ImageOrientationPatient[3:], float)
  dr, dc = (float(v) for v in ds.PixelSpacing)
  for r, c in [(0, 0), (ds.Rows - 1, 0), (0, ds.Columns - 1), (7, 11)]:
    want = origin + r * dr * col_cos + c * dc * row_cos
    np.testing.assert_allclose((affine @ [r, c, 0, 1])[:3], want, atol=1e-9)
    np.testing.assert_allclose(
      (affine_ras @ [r, c, 0, 1])[:3], want * [-1, -1, 1], atol=1e-9
    )


def test_rescale_and_normalisation():
  images = np.array([[[0, 10], [20, 30]], [[5, 5], [5, 5]]], np.int16)
  got = dataset.prepare.float_images(images, [2.0, None], [-1.0, None])
  np.testing.assert_array_equal(got[0, 0], [[-1, 19], [39, 59]])
  np.testing.assert_array_equal(got[1, 0], images[1])
  z = dataset.prepare.float_images(images, [1, 1], [0, 0], 'zscore')
  assert abs(float(z[0].mean())) < 1e-6 and abs(float(z[0].std()) - 1) < 1e-6
  np.testing.assert_array_equal(z[1], 0)  # a constant image stays finite
  m = dataset.prepare.float_images(images, [1, 1], [0, 0], 'minmax')
  assert float(m[0].min()) == 0 and float(m[0].max()) == 1
  halves = dataset.prepare.float_images(images, [1, 1], [0, 0], lambda a: a / 2)
  np.testing.assert_array_equal(halves[0, 0], images[0] / 2)
  with pytest.raises(ValueError, match='normalize must be one of'):
    dataset.prepare.float_images(images, [1, 1], [0, 0], 'z')


def test_label_map_rule_and_the_ignore_value():
  inner = np.zeros((3, 4, 4), bool)
  outer = np.zeros((3, 4, 4), bool)
  inner[:, 1:3, 1:3] = True
  outer[:, 0:4, 0:3] = True
  inner[0, 3, 3] = True  # an inner pixel outside the outer contour: still 1
  has_i = np.array([True, True, False])
  has_o = np.array([True, False, True])
  plain = labels.label_map(
    inner & has_i[:, None, None], outer & has_o[:, None, None], has_i, has_o
  )
  assert plain[0, 3, 3] == labels.BLOOD_POOL and plain[0, 0, 0] == labels.MYOCARDIUM
  assert plain[0, 1, 1] == labels.BLOOD_POOL and plain[0, 0, 3] == labels.BACKGROUND
  marked = labels.label_map(
    inner & has_i[:, None, None], outer & has_o[:, None, None], has_i, has_o, ignore=3
  )
  np.testing.assert_array_equal(marked[0], plain[0])  # both drawn: all decided
  # inner only: outside it the myocardium is unknown
  assert marked[1, 1, 1] == 1 and (marked[1][~inner[1]] == 3).all()
  # outer only: inside it the blood pool is unknown; outside, background
  assert (marked[2][outer[2]] == 3).all() and (marked[2][~outer[2]] == 0).all()


def test_transform_hook_sees_each_batch(written):
  out = written.out
  got = list(
    dataset.iter_batches(
      out, 8, columns=_IDS, transform=lambda b: {'n': len(b['patient_id'])}
    )
  )
  assert sum(b['n'] for b in got) == len(written.manifest.slices)


# ---- the flag filter


def test_excluded_flags_leave_the_flagged_slices_out(tmp_path):
  root, out = str(tmp_path / 'DATA'), str(tmp_path / 'OUT')
  manifest = sample.make_tree(root, patients=3, slices=6, rows=32, columns=32)
  labeled = sorted(k for k, e in manifest.slices.items() if e.i_vertices)
  (p, a), (q, b) = labeled[0], next(k for k in labeled if k[0] != labeled[0][0])
  source = os.path.join(
    root,
    'contourfiles',
    manifest.slices[p, a].original_id,
    'i-contours',
    f'IM-0001-{a:04d}-icontour-manual.txt',
  )
  target = os.path.join(
    root,
    'contourfiles',
    manifest.slices[q, b].original_id,
    'i-contours',
    f'IM-0001-{b:04d}-icontour-manual.txt',
  )
  shutil.copyfile(source, target)
  cli.main(['--input', root, '--output', out])
  flagged = {
    (r['patient_id'], r['slice_index'])
    for r in dataset.open_dataset(out).to_table(columns=[*_IDS, 'qa_flags']).to_pylist()
    if 'duplicate_contour' in r['qa_flags']
  }
  assert flagged == {(p, a), (q, b)}
  kept = _keys(
    dataset.iter_batches(out, 4, columns=_IDS, exclude_flags=['duplicate_contour'])
  )
  assert sorted(kept) == sorted(set(manifest.slices) - flagged)
  rows = dataset.shuffled_rows(
    out, 0, labeled_only=True, exclude_flags=['duplicate_contour']
  )
  assert {(r['patient_id'], r['slice_index']) for r in rows} == {
    k for k, e in manifest.slices.items() if e.labeled
  } - flagged
  with pytest.raises(ValueError, match='is not a quality flag'):
    next(dataset.iter_batches(out, 4, exclude_flags=['duplicate']))


@pytest.mark.parametrize('bad', [-100, 0, 2, 256, 3.5, True])
def test_an_ignore_value_a_uint8_map_cannot_keep_apart_is_refused(written, bad):
  with pytest.raises(ValueError, match='ignore_index must be an integer in 3..255'):
    next(dataset.iter_batches(written.out, 4, label_map=True, ignore_index=bad))
  np.testing.assert_array_equal(
    labels.label_map(
      np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2), bool), [False], [False], 255
    ),
    255,
  )
