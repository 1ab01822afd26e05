"""Optional PyTorch adapter: ``SliceDataset``, an IterableDataset over the output.

Needs torch (not a dependency of the pipeline). Each DataLoader worker reads a
disjoint share of the row groups, so every slice appears once per epoch
whatever ``num_workers`` is::

    ds = SliceDataset('output', seed=0, split='train', labeled_only=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    for epoch in range(10):
        ds.set_epoch(epoch)
        for batch in loader:
            batch['image']   # float32 (B, rows, columns), rescaled if asked
            batch['i_mask']  # bool (B, rows, columns), False where absent
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from beam_pipeline import dataset

_COLUMNS = [
  'patient_id',
  'slice_index',
  'rows',
  'columns',
  'rescale_slope',
  'rescale_intercept',
  'image',
  'i_mask',
  'o_mask',
]


class SliceDataset(IterableDataset):
  """Slices as dicts of tensors, shuffled by (seed, epoch); see module docstring."""

  def __init__(
    self,
    output: str,
    seed: int = 0,
    *,
    split: str | None = None,
    labeled_only: bool = False,
    rescale: bool = False,
    shuffle_buffer: int = 512,
    version: int | None = None,
  ):
    """``version``: the dataset version to read (default: the latest at
    construction, so every epoch and every worker reads the same one)."""
    super().__init__()
    self.output = output
    self.version = dataset.latest_version(output) if version is None else version
    self.seed = seed
    self.split = split
    self.labeled_only = labeled_only
    self.rescale = rescale
    self.shuffle_buffer = shuffle_buffer
    self.epoch = 0

  def set_epoch(self, epoch: int) -> None:
    """Chooses the epoch whose order the next iteration follows."""
    self.epoch = epoch

  def __iter__(self):
    info = get_worker_info()
    shard = (info.id, info.num_workers) if info is not None else (0, 1)
    rows = dataset.shuffled_rows(
      self.output,
      self.seed,
      self.epoch,
      labeled_only=self.labeled_only,
      split=self.split,
      columns=_COLUMNS,
      shuffle_buffer=self.shuffle_buffer,
      shard=shard,
      version=self.version,
    )
    for row in rows:
      shape = (row['rows'], row['columns'])
      masks = {kind: dataset.mask_of(row, kind) for kind in 'io'}
      image = dataset.image_of(row, rescale=self.rescale).astype(np.float32)
      yield {
        'patient_id': row['patient_id'],
        'slice_index': row['slice_index'],
        'image': torch.from_numpy(image),
        **{
          f'{kind}_mask': torch.from_numpy(
            m if m is not None else np.zeros(shape, bool)
          )
          for kind, m in masks.items()
        },
        **{f'has_{kind}_mask': m is not None for kind, m in masks.items()},
      }
