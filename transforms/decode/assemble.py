"""One slice's output row from its decoded image and contour bytes (pure).

No I/O and no Beam: the decode stage reads the files, and hands the outcome
here; tests call these functions directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from transforms.contract import schema
from transforms.contract.errors import ContourError
from transforms.contract.flags import BURNED_IN
from transforms.decode import masks, quality
from transforms.decode.chunks import SliceChunk, SliceTask
from transforms.outcomes import Decoded, Failed

_LOG = logging.getLogger(__name__)


class SliceResult(NamedTuple):
  """A slice's row of SLICE_SCHEMA (``image`` still a numpy array; see
  :func:`slice_table`), and error rows for contours it could not use."""

  row: dict
  errors: list[dict]


class _Mask(NamedTuple):
  vertices: list[tuple[float, float]]
  mask: np.ndarray


def _mask(path: str, data: bytes | Failed, rows: int, columns: int) -> _Mask | Failed:
  """A contour file's polygon and mask, or Failed saying why not."""
  if isinstance(data, Failed):
    return data
  try:
    vertices = masks.parse_contour(data)
    return _Mask(vertices, masks.rasterise(vertices, rows, columns))
  except ContourError as e:
    return Failed(schema.STAGE_CONTOUR, str(e))
  except Exception as e:  # MemoryError or a rasteriser bug: this mask only.
    _LOG.warning('%s: %s: %s', path, type(e).__name__, e)
    return Failed(schema.STAGE_CONTOUR, f'{type(e).__name__}: {e}')


def slice_row(
  chunk: SliceChunk,
  split: str,
  task: SliceTask,
  decoded: Decoded,
  contours: Mapping[str, bytes | Failed],
) -> SliceResult:
  """The row of a decoded slice, with its masks and quality columns.

  Args:
    chunk: the slice's chunk (patient and original id).
    split: the patient's split.
    task: the slice.
    decoded: its image and metadata.
    contours: {kind: the contour file's bytes, or Failed if unreadable} for
      each contour the task names.

  Returns:
    The row, and one error row per contour that could not be used (that
    mask is then null; the slice is still written).
  """
  meta, image = decoded.meta, decoded.image
  pixel_columns, flags = quality.pixel_checks(
    image, meta['bits_stored'], meta['pixel_representation']
  )
  row = {
    'patient_id': chunk.patient_id,
    'original_id': chunk.original_id,
    'slice_index': task.slice_index,
    'split': split,
    'dicom_path': task.dicom_path,
    **meta,
    **pixel_columns,
    'image': image,  # bytes only in slice_table, with no copy before it
    'i_mask': None,
    'o_mask': None,
  }
  errors = []
  drawn = {}
  for kind, path in task.contour_paths().items():
    mask_or_failure = _mask(path, contours[kind], meta['rows'], meta['columns'])
    if isinstance(mask_or_failure, Failed):
      errors.append(
        schema.error_row(
          chunk.patient_id, path, mask_or_failure.stage, mask_or_failure.message
        )
      )
      continue
    row[f'{kind}_mask'] = masks.pack_mask(mask_or_failure.mask)
    contour_columns, contour_flags = quality.contour_checks(
      kind, mask_or_failure.vertices, mask_or_failure.mask
    )
    row.update(contour_columns)
    flags += contour_flags
    drawn[kind] = mask_or_failure.mask
  if len(drawn) == 2:
    row['inner_in_outer'], nesting_flags = quality.nesting_check(drawn['i'], drawn['o'])
    flags += nesting_flags
  if decoded.burned_in is not None:
    flags.append(BURNED_IN)
  row['qa_flags'] = flags
  return SliceResult(row, errors)


_IMAGE = schema.SLICE_SCHEMA.get_field_index('image')
_WITHOUT_IMAGE = schema.SLICE_SCHEMA.remove(_IMAGE)


def slice_table(rows: list[dict]) -> pa.Table:
  """The Arrow table of slice rows from :func:`slice_row`.

  The image column is built from the arrays' memory: one copy into one Arrow
  buffer, where ``tobytes()`` and ``from_pylist`` made two, each as large as
  the images. ``rows`` are emptied of their images as they are copied.
  """
  images = [row.pop('image') for row in rows]
  sizes = np.fromiter((i.nbytes for i in images), np.int64, len(images))
  offsets = np.zeros(len(images) + 1, np.int32)
  np.cumsum(sizes, out=offsets[1:])
  data = np.empty(int(offsets[-1]), np.uint8)
  for image, start, end in zip(images, offsets[:-1], offsets[1:], strict=True):
    data[start:end] = image.reshape(-1).view(np.uint8)
  del images
  column = pa.Array.from_buffers(
    pa.binary(), len(rows), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
  )
  table = pa.Table.from_pylist(rows, schema=_WITHOUT_IMAGE)
  return table.add_column(_IMAGE, schema.SLICE_SCHEMA.field('image'), column)


def unusable_slice(chunk: SliceChunk, task: SliceTask, failed: Failed) -> dict:
  """The error row of a slice whose file could not be read or decoded."""
  contours = len(task.contour_paths())
  unused = f' ({contours} contour file(s) of this slice not used)' if contours else ''
  return schema.error_row(
    chunk.patient_id, task.dicom_path, failed.stage, f'{failed.message}{unused}'
  )
