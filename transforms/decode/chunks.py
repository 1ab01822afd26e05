"""A matched patient's slices, planned into work items (pure).

A Patient fans out into SliceChunks of at most ``chunk_size`` slices; each
chunk is decoded into one Arrow table, which becomes one Parquet row group.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from transforms.contract import layout, splits
from transforms.contract.layout import Patient


class SliceTask(NamedTuple):
  """One slice to decode, with the paths of its contours (None if absent).

  The paths are as shown (pseudonymised, if so); ``sources`` holds where the
  slice and its contours are read, when that differs (never output).
  """

  slice_index: int
  dicom_path: str
  i_contour: str | None
  o_contour: str | None
  sources: tuple[str, str | None, str | None] | None = None  # None: as shown

  def __repr__(self) -> str:
    return f'SliceTask({self.dicom_path!r})'

  def contour_paths(self) -> dict[str, str]:
    """{kind: path} of the contours this slice has, inner first, as shown."""
    return {
      kind: path
      for kind, path in (('i', self.i_contour), ('o', self.o_contour))
      if path is not None
    }

  @property
  def dicom_source(self) -> str:
    """Where the slice is read."""
    return self.sources[0] if self.sources else self.dicom_path

  def contour_sources(self) -> dict[str, str]:
    """{kind: where it is read} of the contours this slice has."""
    if not self.sources:
      return self.contour_paths()
    return {
      kind: path
      for kind, path in (('i', self.sources[1]), ('o', self.sources[2]))
      if path is not None
    }


class SliceChunk(NamedTuple):
  """Up to chunk_size slices of one patient, or, with ``whole_series``, all
  its slices of one PACS series: they are retrieved in one request and
  written as row groups of up to chunk_size slices (``bounds``)."""

  patient_id: str
  original_id: str
  chunk: int
  chunks: int
  slices: tuple[SliceTask, ...]
  position: float | None = None  # see layout.Link.position
  whole_series: bool = False
  assigned: str = ''  # see layout.Patient.assigned

  @property
  def is_last(self) -> bool:
    """True for the patient's last chunk (its patient is then done)."""
    return self.chunk == self.chunks - 1

  def split(self, fractions: tuple[float, float, float]) -> str:
    """The patient's split: the one assigned to it, else its hash split
    (from the patient_id as written in link.csv, so pseudonyms never move a
    patient to another split)."""
    if self.assigned:
      return self.assigned
    return splits.patient_split(self.patient_id, self.position, fractions)


def bounds(n: int, size: int) -> list[int]:
  """Where ``n`` items split into ``ceil(n / size)`` runs of nearly equal
  length, in order: [0, ..., n] (230 at 64: 0, 57, 115, 172, 230)."""
  count = max(1, math.ceil(n / size))
  return [k * n // count for k in range(count + 1)]


def plan_chunks(
  patient: Patient,
  chunk_size: int,
  labeled_only: bool = False,
  whole_series: bool = False,
) -> list[SliceChunk]:
  """Splits a patient's slices into chunks of nearly equal size, in slice order.

  ``ceil(n / chunk_size)`` chunks whose sizes differ by at most one (230
  slices at 64 make 57, 58, 57, 58, not 64, 64, 64, 38): runners deal work
  items out by count, so even items keep every worker busy to the end.
  With ``labeled_only``, only slices with at least one contour file are kept;
  a patient without any then yields no chunk.

  With ``whole_series`` (slices from a PACS, all of one series), one chunk
  holds them all when they are at least half of the patient's slices, so
  that the series is retrieved once; fewer (``labeled_only`` keeping a few)
  are planned as above and retrieved one by one.
  """
  contours: dict[int, dict[str, layout.ContourFile]] = {}
  for contour in patient.contours:
    contours.setdefault(contour.slice_index, {})[contour.kind] = contour
  tasks = [
    _task(d, contours.get(d.slice_index, {}))
    for d in patient.slices
    if not labeled_only or d.slice_index in contours
  ]
  if not tasks:
    return []
  if whole_series and len(tasks) > 1 and 2 * len(tasks) >= len(patient.slices):
    return [
      SliceChunk(
        patient.patient_id,
        patient.original_id,
        0,
        1,
        tuple(tasks),
        patient.position,
        whole_series=True,
        assigned=patient.assigned,
      )
    ]
  cuts = bounds(len(tasks), chunk_size)
  return [
    SliceChunk(
      patient.patient_id,
      patient.original_id,
      k,
      len(cuts) - 1,
      tuple(tasks[cuts[k] : cuts[k + 1]]),
      patient.position,
      assigned=patient.assigned,
    )
    for k in range(len(cuts) - 1)
  ]


def _task(
  dicom: layout.DicomFile, contours: dict[str, layout.ContourFile]
) -> SliceTask:
  inner, outer = contours.get('i'), contours.get('o')
  shown_paths = (dicom.path, inner and inner.path, outer and outer.path)
  read = (dicom.read_path, inner and inner.read_path, outer and outer.read_path)
  return SliceTask(
    dicom.slice_index, *shown_paths, None if read == shown_paths else read
  )
