"""Quality checks on contours and pixels, computed per slice (pure functions).

Each check yields typed columns (see SLICE_SCHEMA) and, when it fails, a flag
name in the ``qa_flags`` column. The flags, and the rule behind each:

  {k}_area_mismatch       |mask pixels - polygon area| > perimeter + 10% of the
                          area (the reference fill leaves the boundary out, so
                          about half the perimeter is expected to differ)
  {k}_empty_mask          the polygon fills no pixel
  {k}_self_intersecting   two non-adjacent edges of the polygon cross
  {k}_vertices_outside    a vertex lies outside [0, columns] x [0, rows]
  inner_outside_outer     less than 99% of the inner mask lies inside the outer
  constant_image          every pixel has the same value
  pixels_out_of_range     a value does not fit BitsStored (with the sign given
                          by PixelRepresentation)

with k = i (inner) or o (outer).
"""

from __future__ import annotations

import numpy as np
import shapely
import xxhash

from transforms.contract.flags import FLAGS

INNER_IN_OUTER_MIN = 0.99
AREA_TOLERANCE = 0.1

QA_FLAGS = tuple(FLAGS)  # names and meanings: transforms.contract.flags


def polygon_area(vertices: np.ndarray) -> float:
  """Shoelace area of a closed polygon given as an (n, 2) array."""
  x, y = vertices[:, 0], vertices[:, 1]
  # Elementwise sums, not np.dot: a BLAS call wakes OpenBLAS's thread pool,
  # which then spins on the cores the pipeline's workers need.
  return float(abs((x * np.roll(y, -1)).sum() - (y * np.roll(x, -1)).sum()) / 2)


def _perimeter(vertices: np.ndarray) -> float:
  return float(np.linalg.norm(vertices - np.roll(vertices, -1, axis=0), axis=1).sum())


def is_self_intersecting(vertices: np.ndarray) -> bool:
  """True when the closed polygon's boundary crosses or touches itself.

  Uses GEOS (shapely), O(n log n), so a contour of a million vertices is fine.
  """
  return not shapely.LinearRing(vertices).is_simple


def contour_checks(
  kind: str, vertices: list[tuple[float, float]], mask: np.ndarray
) -> tuple[dict, list[str]]:
  """Columns and flags of one contour against its rasterised mask."""
  points = np.asarray(vertices, dtype=np.float64)
  rows, columns = mask.shape
  area = polygon_area(points)
  pixels = int(mask.sum())
  outside = int(
    np.count_nonzero(
      (points[:, 0] < 0)
      | (points[:, 0] > columns)
      | (points[:, 1] < 0)
      | (points[:, 1] > rows)
    )
  )
  crossing = is_self_intersecting(points)
  flags = []
  if abs(pixels - area) > _perimeter(points) + AREA_TOLERANCE * area:
    flags.append(f'{kind}_area_mismatch')
  if pixels == 0:
    flags.append(f'{kind}_empty_mask')
  if crossing:
    flags.append(f'{kind}_self_intersecting')
  if outside:
    flags.append(f'{kind}_vertices_outside')
  columns_out = {
    f'{kind}_vertex_count': len(points),
    f'{kind}_polygon_area': area,
    f'{kind}_mask_pixels': pixels,
    f'{kind}_vertices_outside': outside,
    f'{kind}_self_intersecting': crossing,
  }
  return columns_out, flags


def nesting_check(
  inner: np.ndarray, outer: np.ndarray
) -> tuple[float | None, list[str]]:
  """Fraction of the inner mask inside the outer one (None if inner is empty)."""
  total = int(inner.sum())
  if total == 0:
    return None, []
  fraction = int((inner & outer).sum()) / total
  return fraction, ['inner_outside_outer'] if fraction < INNER_IN_OUTER_MIN else []


def pixel_checks(
  image: np.ndarray, bits_stored: int | None, pixel_representation: int | None
) -> tuple[dict, list[str]]:
  """Range, constancy and hash of an image."""
  low, high = image.min(), image.max()
  flags = []
  if low == high:
    flags.append('constant_image')
  if bits_stored and np.issubdtype(image.dtype, np.integer):
    if pixel_representation == 1:
      lowest, highest = -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    else:
      lowest, highest = 0, 2**bits_stored - 1
    if low < lowest or high > highest:
      flags.append('pixels_out_of_range')
  columns = {
    'pixel_min': float(low),
    'pixel_max': float(high),
    'pixel_xxh3': xxhash.xxh3_128_hexdigest(image),  # C-contiguous: no copy
  }
  return columns, flags
