"""Optional PyTorch adapter: ``SliceDataset``, an IterableDataset over the output.

Needs torch (not a dependency of the pipeline); MONAI is used when installed.
Each DataLoader worker reads a disjoint share of the row groups, so every
slice appears once per epoch whatever ``num_workers`` is::

    ds = SliceDataset('output', seed=0, split='train', labeled_only=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    for epoch in range(10):
        ds.set_epoch(epoch)
        for batch in loader:
            batch['image']   # float32 (B, 1, rows, columns), rescaled
            batch['label']   # uint8 (B, 1, rows, columns): 0, 1 or 2

Items are MONAI-style dictionaries, so MONAI's dictionary transforms apply
to them (``transform=Compose([Spacingd(...), ScaleIntensityd(...)])``).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from beam_pipeline import dataset
from beam_pipeline.dataset import labels, prepare

_COLUMNS = [
  'patient_id',
  'slice_index',
  'split',
  'qa_flags',
  'rows',
  'columns',
  'rescale_slope',
  'rescale_intercept',
  'image',
  'i_mask',
  'o_mask',
  *prepare.GEOMETRY_COLUMNS,
]


def _meta_tensor():
  """MONAI's MetaTensor class, or None when MONAI is not installed."""
  try:
    from monai.data import MetaTensor  # noqa: PLC0415
  except ImportError:
    return None
  return MetaTensor


class SliceDataset(IterableDataset):
  """Slices as MONAI-style dicts of tensors, shuffled by (seed, epoch).

  Each item holds:

  - ``image``: float32 (channels, rows, columns), rescale slope and
    intercept applied (unless ``rescale=False``), normalised if asked;
  - ``label``: uint8 (1, rows, columns) label map (``labels``: 0
    background, 1 blood pool, 2 myocardium; ``ignore_index`` for pixels the
    contours do not decide), and ``i_mask`` / ``o_mask``: bool (1, rows,
    columns), all False where absent, with ``has_i_mask`` / ``has_o_mask``;
  - ``affine`` and ``affine_ras``: float64 (4, 4), the slice's affine in
    the DICOM patient frame (LPS) and in RAS, for the index (row, column,
    k) (``geometry``; NaN when the slice's geometry is missing, and
    ``has_geometry`` False); ``pixel_spacing`` (2,), ``image_position_patient``
    (3,), ``image_orientation_patient`` (6,);
  - ``patient_id``, ``slice_index``, ``split`` and ``qa_flags`` (the flags
    joined by commas, '' when none: a DataLoader collates strings, not
    lists of different lengths).

  With MONAI installed (``meta_tensors``, default: when it is), ``image``
  and ``label`` are ``MetaTensor``s whose affine is the slice's in-plane
  grid: diag(row spacing, column spacing, 1, 1). MONAI reduces a 4x4 affine
  to a 2-D image's rank by dropping the third row and column, which for an
  oblique slice would lose part of its spacing; so ``Spacingd`` resamples a
  slice to the millimetres asked for, and the patient-frame affine stays in
  ``affine_ras``.
  """

  def __init__(
    self,
    output: str,
    seed: int = 0,
    *,
    split: str | None = None,
    labeled_only: bool = False,
    patients: Iterable[str] | None = None,
    folds: int | None = None,
    fold: int | None = None,
    holdout: bool = False,
    exclude_flags: Iterable[str] = (),
    rescale: bool = True,
    normalize: str | Callable | None = None,
    ignore_index: int | None = None,
    label_map: bool = True,
    geometry: bool = True,
    transform: Callable[[dict], dict] | None = None,
    meta_tensors: bool | None = None,
    shuffle_buffer: int = 512,
    version: int | None = None,
  ):
    """Which slices and the reader's settings: as ``iter_batches``.

    Args:
      label_map: add ``label`` (off: a lighter item).
      geometry: add the affines and header vectors (off: a lighter item;
        MetaTensors then get an identity affine).
      transform: called on each item (e.g. a MONAI ``Compose`` of dictionary
        transforms); its result is yielded.
      meta_tensors: ``image`` and ``label`` as MONAI MetaTensors (default:
        when MONAI is installed and ``geometry`` is on).
      version: the dataset version to read (default: the latest at
        construction, so every epoch and every worker reads the same one).

    Raises:
      ImportError: ``meta_tensors=True`` without MONAI.
    """
    super().__init__()
    if isinstance(patients, str):
      raise ValueError('patients must be a collection of patient ids, not one string')
    labels.check_flags(exclude_flags)
    labels.check_ignore(ignore_index)
    self.output = output
    self.version = dataset.latest_version(output) if version is None else version
    self.seed = seed
    self.selection = {
      'split': split,
      'labeled_only': labeled_only,
      'patients': None if patients is None else sorted(patients),
      'folds': folds,
      'fold': fold,
      'holdout': holdout,
      'exclude_flags': tuple(exclude_flags),
    }
    self.rescale = rescale
    self.normalize = normalize
    self.ignore_index = ignore_index
    self.label_map = label_map
    self.geometry = geometry
    self.transform = transform
    if meta_tensors and _meta_tensor() is None:
      raise ImportError('meta_tensors=True needs MONAI: pip install monai')
    if meta_tensors is None:
      meta_tensors = geometry and _meta_tensor() is not None
    self.meta_tensors = meta_tensors
    self.shuffle_buffer = shuffle_buffer
    # Shared with the DataLoader's workers, persistent ones included: each
    # reads it when its iteration starts.
    self._epoch = multiprocessing.get_context().Value('q', 0, lock=False)

  @property
  def epoch(self) -> int:
    return self._epoch.value

  def set_epoch(self, epoch: int) -> None:
    """Chooses the epoch whose order the next iteration follows (in every
    worker, persistent ones too)."""
    self._epoch.value = epoch

  def __iter__(self):
    info = get_worker_info()
    shard = (info.id, info.num_workers) if info is not None else (0, 1)
    rows = dataset.shuffled_rows(
      self.output,
      self.seed,
      self.epoch,
      **self.selection,
      columns=_COLUMNS,
      shuffle_buffer=self.shuffle_buffer,
      shard=shard,
      version=self.version,
    )
    meta = _meta_tensor() if self.meta_tensors else None
    for row in rows:
      item = self._item(row, meta)
      yield item if self.transform is None else self.transform(item)

  def _item(self, row: dict, meta) -> dict:
    shape = (row['rows'], row['columns'])
    slope = row['rescale_slope'] if self.rescale else None
    intercept = row['rescale_intercept'] if self.rescale else None
    image = prepare.float_images(
      dataset.image_of(row)[None], [slope], [intercept], self.normalize
    )[0]
    masks = {kind: dataset.mask_of(row, kind) for kind in 'io'}
    has = {kind: m is not None for kind, m in masks.items()}
    masks = {
      k: np.zeros((1, *shape), bool) if m is None else m[None] for k, m in masks.items()
    }
    item = {
      'image': torch.from_numpy(image),
      **{f'{k}_mask': torch.from_numpy(m) for k, m in masks.items()},
      **{f'has_{k}_mask': h for k, h in has.items()},
      'patient_id': row['patient_id'],
      'slice_index': row['slice_index'],
      'split': row['split'],
      'qa_flags': ','.join(row['qa_flags']),
    }
    if self.label_map:
      item['label'] = torch.from_numpy(
        prepare.label_maps(
          masks['i'], masks['o'], [has['i']], [has['o']], self.ignore_index
        )[0]
      )
    if self.geometry:
      item.update(_geometry(row))
    if meta is not None:
      grid = torch.eye(4, dtype=torch.float64)
      if self.geometry and item['has_geometry']:
        grid[0, 0], grid[1, 1] = item['pixel_spacing'][0], item['pixel_spacing'][1]
      for key in ('image', 'label'):
        if key in item:
          item[key] = meta(item[key], affine=grid.clone())
    return item


def _geometry(row: dict) -> dict:
  """An item's affines and header vectors (NaN where absent)."""
  affine = prepare.slice_affine(
    row['image_position_patient'],
    row['image_orientation_patient'],
    row['pixel_spacing'],
    row['slice_thickness'],
  )
  known = affine is not None
  affine = affine if known else np.full((4, 4), np.nan)
  return {
    'affine': torch.from_numpy(affine),
    'affine_ras': torch.from_numpy(prepare.ras(affine)),
    'has_geometry': known,
    'pixel_spacing': _vector(row['pixel_spacing'], 2),
    'image_position_patient': _vector(row['image_position_patient'], 3),
    'image_orientation_patient': _vector(row['image_orientation_patient'], 6),
  }


def _vector(values, size: int) -> torch.Tensor:
  """A header vector as float64, NaN when absent."""
  return torch.from_numpy(
    np.array(values if values else [np.nan] * size, dtype=np.float64)
  )
