"""Label maps from the inner and outer masks, and the quality-flag filter.

A label map gives each pixel one class::

    0  background      outside the outer contour
    1  blood pool      inside the inner (endocardial) contour
    2  myocardium      inside the outer (epicardial) contour, outside the inner

The inner contour wins where the two overlap (an inner pixel outside the
outer contour is still 1). A slice may have only one of its contours drawn:
then some pixels are not decided by the drawing (inside an outer contour
without an inner one, the blood pool is not marked; outside an inner
contour without an outer one, the myocardium is not). With ``ignore=None``
an absent contour counts as empty (those pixels become 2 and 0); with
``ignore=k`` they get ``k``, the value a loss should skip (nnU-Net's
"ignore" label, ``ignore_index`` in PyTorch's losses). A slice with neither
contour is then ``k`` everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transforms.contract.flags import FLAGS

BACKGROUND = 0
BLOOD_POOL = 1
MYOCARDIUM = 2
NAMES = {'background': BACKGROUND, 'blood_pool': BLOOD_POOL, 'myocardium': MYOCARDIUM}


def label_map(
  inner: np.ndarray,
  outer: np.ndarray,
  has_inner,
  has_outer,
  ignore: int | None = None,
) -> np.ndarray:
  """The uint8 label map of masks shaped (..., rows, columns).

  Args:
    inner, outer: bool masks, all False where a slice has none.
    has_inner, has_outer: whether each slice has the mask: a bool, or an
      array of the masks' leading shape (e.g. (batch,)).
    ignore: the value for pixels the drawn contours do not decide (see the
      module docstring), or None to count an absent contour as empty.
  """
  check_ignore(ignore)
  inner = np.asarray(inner, dtype=bool)
  outer = np.asarray(outer, dtype=bool)
  labels = np.zeros(np.broadcast_shapes(inner.shape, outer.shape), np.uint8)
  labels[outer] = MYOCARDIUM
  labels[inner] = BLOOD_POOL
  if ignore is None:
    return labels
  has_i = _per_pixel(has_inner, labels.ndim)
  has_o = _per_pixel(has_outer, labels.ndim)
  undecided = (outer & ~has_i) | (~inner & ~has_o)
  labels[np.broadcast_to(undecided, labels.shape)] = ignore
  return labels


def check_ignore(ignore: int | None) -> None:
  """Refuses an ignore value a uint8 label map cannot hold apart from the
  classes.

  Raises:
    ValueError: not None and not an integer in 3..255.
  """
  if ignore is None:
    return
  if (
    isinstance(ignore, bool)
    or not isinstance(ignore, (int, np.integer))
    or not (MYOCARDIUM < ignore <= 255)
  ):
    raise ValueError(
      f'ignore_index must be an integer in {MYOCARDIUM + 1}..255 (labels are '
      f'uint8; 0..{MYOCARDIUM} are classes), got {ignore!r}: e.g. 255, and pass '
      'the same value to the loss (CrossEntropyLoss(ignore_index=255))'
    )


def _per_pixel(has, ndim: int) -> np.ndarray:
  """A per-slice flag shaped to broadcast over (..., rows, columns)."""
  flags = np.asarray(has, dtype=bool)
  return flags.reshape(flags.shape + (1,) * (ndim - flags.ndim))


def check_flags(flags: Iterable[str]) -> tuple[str, ...]:
  """The quality flags named, sorted, once each.

  Raises:
    ValueError: a name that is not a quality flag (or a lone string).
  """
  if isinstance(flags, str):
    raise ValueError(f'exclude_flags must be a list of flags, got {flags!r}')
  wanted = tuple(sorted(set(flags)))
  unknown = [f for f in wanted if f not in FLAGS]
  if unknown:
    raise ValueError(
      f'exclude_flags: {", ".join(unknown)} is not a quality flag '
      f'(one of: {", ".join(FLAGS)})'
    )
  return wanted


def without_flags(table: pa.Table, flags: Iterable[str]) -> pa.Array | None:
  """Per row: True when its ``qa_flags`` holds none of ``flags`` (None when
  ``flags`` is empty: keep every row).

  Raises:
    ValueError: see :func:`check_flags`.
  """
  wanted = check_flags(flags)
  if not wanted:
    return None
  column = pa.concat_arrays(table['qa_flags'].chunks) if table.num_rows else None
  keep = np.ones(table.num_rows, bool)
  if column is not None:
    hits = pc.is_in(pc.list_flatten(column), value_set=pa.array(wanted))
    parents = pc.list_parent_indices(column).to_numpy()
    keep[parents[hits.to_numpy(zero_copy_only=False)]] = False
  return pa.array(keep)
