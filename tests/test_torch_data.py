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


@pytest.mark.parametrize('workers', [0, 2])
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
  assert batch['image'].shape == (24, *WRITTEN_SHAPE)
  assert batch['i_mask'].dtype == torch.bool
  for i, (pid, k) in enumerate(
    zip(batch['patient_id'], batch['slice_index'], strict=True)
  ):
    expected = sample.expected_image(pid, int(k), *WRITTEN_SHAPE).astype(np.float32)
    np.testing.assert_array_equal(batch['image'][i].numpy(), expected)
    labeled = manifest.slices[pid, int(k)].i_vertices is not None
    assert bool(batch['has_i_mask'][i]) == labeled
    assert bool(batch['i_mask'][i].any()) == labeled
