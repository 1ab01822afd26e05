"""A matched patient's slices, planned into work items (pure).

A Patient fans out into SliceChunks of at most ``chunk_size`` slices; each
chunk is decoded into one Arrow table, which becomes one Parquet row group.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from beam_pipeline.contract.layout import Patient


class SliceTask(NamedTuple):
  """One slice to decode, with the paths of its contours (None if absent)."""

  slice_index: int
  dicom_path: str
  i_contour: str | None
  o_contour: str | None

  def contour_paths(self) -> dict[str, str]:
    """{kind: path} of the contours this slice has, inner first."""
    return {
      kind: path
      for kind, path in (('i', self.i_contour), ('o', self.o_contour))
      if path is not None
    }


class SliceChunk(NamedTuple):
  """Up to chunk_size slices of one patient."""

  patient_id: str
  original_id: str
  chunk: int
  chunks: int
  slices: tuple[SliceTask, ...]

  @property
  def is_last(self) -> bool:
    """True for the patient's last chunk (its patient is then done)."""
    return self.chunk == self.chunks - 1


def plan_chunks(
  patient: Patient, chunk_size: int, labeled_only: bool = False
) -> list[SliceChunk]:
  """Splits a patient's slices into chunks of nearly equal size, in slice order.

  ``ceil(n / chunk_size)`` chunks whose sizes differ by at most one (230
  slices at 64 make 57, 58, 57, 58, not 64, 64, 64, 38): runners deal work
  items out by count, so even items keep every worker busy to the end.
  With ``labeled_only``, only slices with at least one contour file are kept;
  a patient without any then yields no chunk.
  """
  contours: dict[int, dict[str, str]] = {}
  for contour in patient.contours:
    contours.setdefault(contour.slice_index, {})[contour.kind] = contour.path
  tasks = [
    SliceTask(
      d.slice_index,
      d.path,
      contours.get(d.slice_index, {}).get('i'),
      contours.get(d.slice_index, {}).get('o'),
    )
    for d in patient.slices
    if not labeled_only or d.slice_index in contours
  ]
  if not tasks:
    return []
  count = math.ceil(len(tasks) / chunk_size)
  bounds = [k * len(tasks) // count for k in range(count + 1)]
  return [
    SliceChunk(
      patient.patient_id,
      patient.original_id,
      k,
      count,
      tuple(tasks[bounds[k] : bounds[k + 1]]),
    )
    for k in range(count)
  ]
