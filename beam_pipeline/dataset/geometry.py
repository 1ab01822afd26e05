"""Where a slice's pixels lie in the patient: affines from the DICOM header
columns, pure numpy.

DICOM's patient frame is LPS (x to the patient's left, y to posterior, z to
head), in millimetres. A pixel at (row r, column c) of a slice lies at::

    image_position_patient + r * pixel_spacing[0] * column_cosine
                           + c * pixel_spacing[1] * row_cosine

where ``image_orientation_patient`` holds the row cosine (the direction of
increasing column index) then the column cosine (increasing row index). An
affine here maps the array's own index order to that frame: ``(row, column,
0, 1)`` for a slice, ``(z, row, column, 1)`` for a volume (see
``volumes``). ``to_ras`` gives the form NIfTI and MONAI use (x and y negated).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# LPS <-> RAS: x and y change sign.
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def cosines(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  """(row cosine, column cosine) of ``image_orientation_patient``.

  Raises:
    ValueError: not six finite numbers, or not two orthogonal unit vectors
      (within 1e-3).
  """
  values = np.asarray(orientation, dtype=np.float64)
  if values.shape != (6,) or not np.all(np.isfinite(values)):
    raise ValueError(f'image_orientation_patient must be 6 numbers, got {orientation}')
  row, column = values[:3], values[3:]
  if (
    abs(np.linalg.norm(row) - 1) > 1e-3
    or abs(np.linalg.norm(column) - 1) > 1e-3
    or abs(float(row @ column)) > 1e-3
  ):
    raise ValueError(
      f'image_orientation_patient {list(orientation)} is not two orthogonal '
      'unit vectors'
    )
  return row, column


def normal(orientation: Sequence[float]) -> np.ndarray:
  """The slice normal: row cosine x column cosine (unit length)."""
  row, column = cosines(orientation)
  n = np.cross(row, column)
  return n / np.linalg.norm(n)


def slice_affine(
  position: Sequence[float],
  orientation: Sequence[float],
  spacing: Sequence[float],
  thickness: float | None = None,
) -> np.ndarray:
  """The 4x4 LPS affine of a slice for the index ``(row, column, k)``: the
  third column is the normal times ``thickness`` (1 mm when unknown or not
  positive), so
  the matrix is invertible.

  Raises:
    ValueError: a missing or malformed position, orientation or spacing.
  """
  origin = _vector(position, 3, 'image_position_patient')
  dr, dc = _vector(spacing, 2, 'pixel_spacing')
  row, column = cosines(orientation)
  affine = np.eye(4)
  affine[:3, 0] = column * dr
  affine[:3, 1] = row * dc
  usable = thickness is not None and np.isfinite(thickness) and thickness > 0
  affine[:3, 2] = normal(orientation) * (thickness if usable else 1.0)
  affine[:3, 3] = origin
  return affine


def volume_affine(
  first_position: Sequence[float],
  orientation: Sequence[float],
  spacing: Sequence[float],
  gap: float,
) -> np.ndarray:
  """The 4x4 LPS affine of a volume for the index ``(z, row, column)``:
  ``first_position`` is the slice at z = 0 and ``gap`` the signed distance
  between slices along the normal."""
  affine = slice_affine(first_position, orientation, spacing)
  return affine[:, [2, 0, 1, 3]] @ np.diag([gap, 1.0, 1.0, 1.0])


def to_ras(affine: np.ndarray) -> np.ndarray:
  """An LPS affine in RAS (NIfTI's and MONAI's frame)."""
  return _FLIP @ affine


def _vector(values, size: int, name: str) -> np.ndarray:
  if values is None:
    raise ValueError(f'{name} is missing')
  vector = np.asarray(values, dtype=np.float64)
  if vector.shape != (size,) or not np.all(np.isfinite(vector)):
    raise ValueError(f'{name} must be {size} numbers, got {values}')
  return vector
