"""What a training step wants from a batch of slice rows: float images,
channel first, optionally normalised; label maps; affines. Pure numpy.

Used by ``iter_batches`` (whole batches) and the PyTorch adapter (one slice
at a time: a batch of one).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

from beam_pipeline.dataset import geometry, labels

# Columns each view needs from the table.
FLOAT_COLUMNS = ('image', 'rescale_slope', 'rescale_intercept')
LABEL_COLUMNS = ('i_mask', 'o_mask')
GEOMETRY_COLUMNS = (
  'pixel_spacing',
  'slice_thickness',
  'image_position_patient',
  'image_orientation_patient',
)
NORMALISATIONS = ('zscore', 'minmax')


def channel_first(images) -> np.ndarray | list:
  """(batch, rows, columns[, samples]) -> (batch, channels, rows, columns);
  a list of arrays (shapes differ within the batch) item by item."""
  if isinstance(images, list):
    return [channel_first(image[None])[0] for image in images]
  if images.ndim == 4:  # samples last, as stored
    return np.moveaxis(images, -1, 1)
  return images[:, None]


def float_images(
  images,
  slopes: Sequence,
  intercepts: Sequence,
  normalize: str | Callable | None = None,
) -> np.ndarray | list:
  """Channel-first float32 images with the rescale applied (slope 1 and
  intercept 0 where absent), then normalised per image:

  - ``'zscore'``: minus the image's mean, over its standard deviation (1
    where the image is constant);
  - ``'minmax'``: to [0, 1] (0 where the image is constant);
  - a callable: takes and returns one (channels, rows, columns) array.
  """
  if normalize is not None and not callable(normalize):
    if normalize not in NORMALISATIONS:
      raise ValueError(
        f'normalize must be one of {", ".join(NORMALISATIONS)} or a callable, '
        f'got {normalize!r}'
      )
  slope = np.array([1.0 if s is None else s for s in slopes], np.float32)
  intercept = np.array([0.0 if i is None else i for i in intercepts], np.float32)
  if isinstance(images, list):
    return [
      float_images(image[None], [s], [i], normalize)[0]
      for image, s, i in zip(images, slopes, intercepts, strict=True)
    ]
  out = channel_first(images).astype(np.float32)
  out *= slope[:, None, None, None]
  out += intercept[:, None, None, None]
  if normalize is None:
    return out
  if callable(normalize):
    return np.stack([np.asarray(normalize(image), np.float32) for image in out])
  axes = tuple(range(1, out.ndim))
  if normalize == 'zscore':
    mean = out.mean(axis=axes, keepdims=True)
    std = out.std(axis=axes, keepdims=True)
    return (out - mean) / np.where(std > 0, std, 1)
  low = out.min(axis=axes, keepdims=True)
  span = out.max(axis=axes, keepdims=True) - low
  return (out - low) / np.where(span > 0, span, 1)


def label_maps(
  inner: np.ndarray,
  outer: np.ndarray,
  has_inner: np.ndarray,
  has_outer: np.ndarray,
  ignore: int | None = None,
) -> np.ndarray:
  """(batch, 1, rows, columns) uint8 label maps (``labels.label_map``)."""
  return labels.label_map(inner, outer, has_inner, has_outer, ignore)[:, None]


def affines(
  positions: Sequence, orientations: Sequence, spacings: Sequence, thicknesses
) -> np.ndarray:
  """(batch, 4, 4) LPS affines of slices (``geometry.slice_affine``, index
  (row, column, k)); all NaN for a slice whose geometry is missing or
  malformed."""
  out = np.full((len(positions), 4, 4), np.nan)
  rows = zip(positions, orientations, spacings, thicknesses, strict=True)
  for k, parts in enumerate(rows):
    affine = slice_affine(*parts)
    if affine is not None:
      out[k] = affine
  return out


def slice_affine(position, orientation, spacing, thickness) -> np.ndarray | None:
  """``geometry.slice_affine``, or None where the geometry is missing or
  malformed; the slices of a series share their orientation, spacing and
  thickness, whose part of the matrix is worked out once."""
  if position is None or orientation is None or spacing is None:
    return None
  frame = _frame(tuple(orientation), tuple(spacing), thickness)
  if frame is None or len(position) != 3 or not all(map(math.isfinite, position)):
    return None
  affine = frame.copy()
  affine[:3, 3] = position
  return affine


@functools.lru_cache(maxsize=256)
def _frame(orientation: tuple, spacing: tuple, thickness) -> np.ndarray | None:
  try:
    return geometry.slice_affine((0.0, 0.0, 0.0), orientation, spacing, thickness)
  except ValueError:
    return None


def ras(affine: np.ndarray) -> np.ndarray:
  """LPS affines (..., 4, 4) in RAS."""
  return geometry.to_ras(affine)
