"""The PyTorch adapter; skipped cleanly where torch is not installed."""

import numpy as np
import pytest

from beam_pipeline.tools import sample

torch = pytest.importorskip('torch')

from beam_pipeline.dataset.torch_data import SliceDataset  # noqa: E402
from tests.conftest import WRITTEN_SHAPE  # noqa: E402


def _keys(loader):
  return [
    (pid, int(k))
    for batch in loader
    for pid, k in zip(batch['patient_id'], batch['slice_index'], strict=True)
  ]


@pytest.mark.parametrize('workers', [0, 2, 4])
def test_dataloader_yields_each_slice_once_per_epoch(written, workers):
  out, manifest = written.out, written.manifest
  ds = SliceDataset(out, seed=4)
  loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers)
  first = _keys(loader)
  assert sorted(first) == sorted(manifest.slices)
  ds.set_epoch(1)
  second = _keys(loader)
  assert sorted(second) == sorted(first) and second != first


def test_tensors_hold_the_image_and_masks(written):
  out, manifest = written.out, written.manifest
  batch = next(iter(torch.utils.data.DataLoader(SliceDataset(out), batch_size=24)))
  assert batch['image'].dtype == torch.float32
  assert batch['image'].shape == (24, 1, *WRITTEN_SHAPE)
  assert batch['i_mask'].dtype == torch.bool
  assert batch['i_mask'].shape == batch['label'].shape == (24, 1, *WRITTEN_SHAPE)
  for i, (pid, k) in enumerate(
    zip(batch['patient_id'], batch['slice_index'], strict=True)
  ):
    expected = sample.expected_image(pid, int(k), *WRITTEN_SHAPE).astype(np.float32)
    np.testing.assert_array_equal(batch['image'][i, 0].numpy(), expected)
    labeled = manifest.slices[pid, int(k)].i_vertices is not None
    assert bool(batch['has_i_mask'][i]) == labeled
    assert bool(batch['i_mask'][i].any()) == labeled


def test_set_epoch_reaches_persistent_workers(written):
  out = written.out
  ds = SliceDataset(out, seed=4)
  fresh = [
    _keys(
      torch.utils.data.DataLoader(
        _at(SliceDataset(out, seed=4), e), batch_size=5, num_workers=2
      )
    )
    for e in range(3)
  ]
  assert fresh[0] != fresh[1] != fresh[2]
  loader = torch.utils.data.DataLoader(
    ds, batch_size=5, num_workers=2, persistent_workers=True
  )
  for epoch in range(3):
    ds.set_epoch(epoch)
    assert _keys(loader) == fresh[epoch]


def _at(ds, epoch):
  ds.set_epoch(epoch)
  return ds


def test_items_carry_geometry_labels_ids_and_a_transform(written):
  out, manifest = written.out, written.manifest
  seen = []
  ds = SliceDataset(
    out,
    exclude_flags=['duplicate_contour'],
    transform=lambda item: {**item, 'seen': seen.append(item['patient_id']) or 1},
    meta_tensors=False,
  )
  items = list(ds)
  assert len(items) == len(manifest.slices) == len(seen)
  item = next(i for i in items if i['qa_flags'] == '')  # the rows' order is free
  assert item['seen'] == 1 and item['has_geometry']
  assert item['affine'].shape == item['affine_ras'].shape == (4, 4)
  np.testing.assert_allclose(
    item['affine_ras'].numpy(), np.diag([-1, -1, 1, 1]) @ item['affine'].numpy()
  )
  assert item['pixel_spacing'].tolist() == [1.40625, 1.40625]
  assert item['split'] in ('train', 'val', 'test')
  e = manifest.slices[item['patient_id'], int(item['slice_index'])]
  assert bool(item['has_i_mask']) == (e.i_vertices is not None)
  assert int((item['label'] == 1).sum()) == int(item['i_mask'].sum())
  batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
  assert batch['affine'].shape == (4, 4, 4) and len(batch['qa_flags']) == 4


def test_a_monai_transform_chain_runs_on_the_items(written):
  monai = pytest.importorskip('monai')
  from monai.transforms import Compose, ScaleIntensityd, Spacingd

  out = written.out
  chain = Compose(
    [
      Spacingd(
        keys=['image', 'label'], pixdim=(2.8125, 1.40625), mode=('bilinear', 'nearest')
      ),
      ScaleIntensityd(keys='image'),
    ]
  )
  ds = SliceDataset(out, labeled_only=True, transform=chain)
  item = next(iter(ds))
  assert isinstance(item['image'], monai.data.MetaTensor)
  # the rows' spacing doubled: half the rows, the same columns
  rows, columns = WRITTEN_SHAPE
  assert item['image'].shape == (1, rows // 2, columns)
  assert item['label'].shape == (1, rows // 2, columns)
  assert float(item['image'].min()) == 0.0 and float(item['image'].max()) == 1.0
  assert set(torch.unique(item['label']).tolist()) <= {0, 1, 2}
  loader = monai.data.DataLoader(ds, batch_size=3)
  assert next(iter(loader))['image'].shape == (3, 1, rows // 2, columns)


def test_bad_arguments_are_refused_at_construction(written):
  with pytest.raises(ValueError, match='not one string'):
    SliceDataset(written.out, patients='SCD0000101')
  with pytest.raises(ValueError, match='must be a list of flags'):
    SliceDataset(written.out, exclude_flags='duplicate_slice')
  with pytest.raises(ValueError, match='ignore_index'):
    SliceDataset(written.out, ignore_index=-100)


def test_a_lean_item_holds_the_image_and_masks_only(written):
  item = next(
    iter(SliceDataset(written.out, label_map=False, geometry=False, meta_tensors=False))
  )
  assert {'image', 'i_mask', 'o_mask', 'has_i_mask', 'patient_id'} <= set(item)
  assert not {'label', 'affine', 'affine_ras', 'pixel_spacing'} & set(item)
  assert type(item['image']) is torch.Tensor and item['image'].shape[0] == 1
