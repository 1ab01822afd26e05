"""Reading the dataset back, without Beam: the output's public reader.

``reader`` holds it (tables, images and masks, shuffled batches, checks);
``torch_data`` wraps it for PyTorch (an optional extra). The names below are
the reader's public ones, so ``from beam_pipeline.dataset import iter_batches``
is what a training script writes.
"""

from beam_pipeline.dataset.reader import (
  DatasetError,
  check,
  file_problems,
  image_of,
  iter_batches,
  mask_of,
  open_dataset,
  read_errors,
  read_reconciliation,
  read_summary,
  row_groups,
  shuffled_rows,
  unpack_mask,
)
from beam_pipeline.dataset.versions import history
from beam_pipeline.dataset.versions import latest as latest_version

__all__ = [
  'DatasetError',
  'check',
  'file_problems',
  'history',
  'image_of',
  'iter_batches',
  'latest_version',
  'mask_of',
  'open_dataset',
  'read_errors',
  'read_reconciliation',
  'read_summary',
  'row_groups',
  'shuffled_rows',
  'unpack_mask',
]
