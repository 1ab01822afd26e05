"""Reading the dataset back, without Beam: the output's public reader.

``reader`` holds it (tables, images and masks, shuffled batches, folds,
checks); ``prepare``, ``labels`` and ``geometry`` make training views of a
batch (float images, label maps, affines); ``volumes`` stacks a patient's
slices; ``torch_data`` wraps the reader for PyTorch and MONAI (an optional
extra). The names below are
the reader's public ones, so ``from beam_pipeline.dataset import iter_batches``
is what a training script writes.
"""

from beam_pipeline.dataset.reader import (
  DatasetError,
  check,
  file_problems,
  folds,
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
  'folds',
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
