"""Reconciliation: link rows against the tree's files, joined with CoGroupByKey.

Only ids and paths travel through the joins; pixels are read later, per
patient, after the join (see ``transforms.decode.stage``). The inputs come from
``transforms.sources.listing`` (or any source of the same records).

The data tree keys DICOM folders by patient_id and contour folders by
original_id, so there are two joins: contour files are attached to their link
row by original_id, then links meet DICOM files by patient_id.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam import pvalue

from transforms.contract import layout, schema
from transforms.contract.layout import Patient
from transforms.sources.source import TREE, Source, Wording


class _Linked(NamedTuple):
  link: layout.Link
  contours: tuple[layout.ContourFile, ...]


@beam.typehints.with_output_types(tuple[str, _Linked])
class _AttachContoursFn(beam.DoFn):
  """One original_id: its link row (if any) and its contour files."""

  def process(self, element):
    original_id, grouped = element
    links = list(grouped['links'])
    contours = tuple(sorted(_files_of(grouped['contours'])))
    if not links:
      yield pvalue.TaggedOutput(
        Reconcile.RECONCILIATION,
        schema.reconciliation_row(
          '',
          original_id,
          schema.UNLINKED_CONTOURS,
          f'{layout.CONTOUR_DIR}/{original_id}/ holds {len(contours)} contour '
          'files and no link.csv row names it',
        ),
      )
      return
    # parse_links leaves at most one link per original_id.
    link = links[0]
    yield link.patient_id, _Linked(link, contours)


@beam.typehints.with_output_types(Patient)
class _MatchPatientsFn(beam.DoFn):
  """One patient_id: its link (with contours) and its DICOM files."""

  def __init__(self, wording: Wording):
    self._wording = wording

  def process(self, element):
    patient_id, grouped = element
    linked = list(grouped['linked'])
    reported = any(True for _ in grouped.get('reported', ()))
    dicoms = sorted(_files_of(grouped['dicoms']), key=lambda d: d.slice_index)
    if not linked:
      yield self._row(
        patient_id,
        '',
        schema.UNLINKED_DICOMS,
        f'{layout.DICOM_DIR}/{patient_id}/ holds {len(dicoms)} '
        'slices and no link.csv row names it',
      )
      return
    link, contours = linked[0]
    original_id = link.original_id
    if not contours:
      yield self._row(
        patient_id,
        original_id,
        schema.MISSING_CONTOURS,
        f'line {link.line}: no contour files under '
        f'{layout.CONTOUR_DIR}/{original_id}/'
        + (f'; its {len(dicoms)} slice files have no masks' if dicoms else ''),
      )
    if not dicoms:
      if not reported:  # else rows of the source already say why
        yield self._row(
          patient_id,
          original_id,
          schema.MISSING_DICOMS,
          f'line {link.line}: ' + self._wording.no_slices.format(patient_id=patient_id),
        )
      return
    indices = {d.slice_index for d in dicoms}
    usable = []
    for contour in contours:
      if contour.slice_index in indices:
        usable.append(contour)
      else:
        yield self._row(
          patient_id,
          original_id,
          schema.CONTOUR_WITHOUT_DICOM,
          f'{contour.path}: '
          + self._wording.no_slice.format(
            patient_id=patient_id, slice_index=contour.slice_index
          ),
        )
    kinds = [c.kind for c in usable]
    yield self._row(
      patient_id,
      original_id,
      schema.MATCHED,
      f'{len(dicoms)} slices, {kinds.count("i")} i-contours, '
      f'{kinds.count("o")} o-contours',
    )
    yield Patient(
      patient_id,
      original_id,
      tuple(dicoms),
      tuple(usable),
      link.position,
      layout.fingerprint((patient_id, original_id, link.position), dicoms, usable),
    )

  @staticmethod
  def _row(patient_id, original_id, status, detail):
    return pvalue.TaggedOutput(
      Reconcile.RECONCILIATION,
      schema.reconciliation_row(patient_id, original_id, status, detail),
    )


def _files_of(groups) -> Iterator:
  """The files of an owner's FileGroups."""
  return itertools.chain.from_iterable(group.files for group in groups)


def _key_by(field: str, record: type) -> beam.PTransform:
  """Records as (record.<field>, record): a str key, encoded deterministically."""
  get = operator.attrgetter(field)
  return beam.Map(lambda r: (get(r), r)).with_output_types(tuple[str, record])


class Reconcile(beam.PTransform):
  """Link rows and the tree's files, reconciled.

  Takes a dict of PCollections: LINKS (layout.Link), DICOMS and CONTOURS
  (layout.FileGroups of DicomFiles and of ContourFiles: the join holds one
  element per folder, not per file), and optionally
  REPORTED: patient ids whose missing slices the source has already explained
  in rows of its own (a PACS search), so no missing_dicoms row is added.
  ``wording`` says where slices were looked for (TREE or PACS). Returns a dict:
  PATIENTS (matched layout.Patients, ids and paths only) and RECONCILIATION
  (report rows: one per matched patient and one per mismatch found).
  """

  LINKS = Source.LINKS
  DICOMS = Source.DICOMS
  CONTOURS = Source.CONTOURS
  REPORTED = Source.REPORTED
  PATIENTS = 'patients'
  RECONCILIATION = 'reconciliation'

  def __init__(self, wording: Wording = TREE):
    super().__init__()
    self._wording = wording

  def expand(self, inputs):
    linked = (
      {
        'links': inputs[self.LINKS]
        | 'LinksByOriginalId' >> _key_by('original_id', layout.Link),
        'contours': inputs[self.CONTOURS]
        | 'ContoursByOriginalId' >> _key_by('owner_id', layout.FileGroup),
      }
      | 'JoinByOriginalId' >> beam.CoGroupByKey()
      | 'AttachContours'
      >> beam.ParDo(_AttachContoursFn()).with_outputs(
        self.RECONCILIATION, main='linked'
      )
    )
    by_patient = {
      'linked': linked.linked,
      'dicoms': inputs[self.DICOMS]
      | 'DicomsByPatient' >> _key_by('owner_id', layout.FileGroup),
    }
    if self.REPORTED in inputs:
      by_patient['reported'] = inputs[self.REPORTED] | 'ReportedByPatient' >> beam.Map(
        lambda pid: (pid, True)
      ).with_output_types(tuple[str, bool])
    matched = (
      by_patient
      | 'JoinByPatient' >> beam.CoGroupByKey()
      | 'MatchPatients'
      >> beam.ParDo(_MatchPatientsFn(self._wording)).with_outputs(
        self.RECONCILIATION, main=self.PATIENTS
      )
    )
    reconciliation = (
      linked[self.RECONCILIATION],
      matched[self.RECONCILIATION],
    ) | 'AllReconciliation' >> beam.Flatten()
    return {self.PATIENTS: matched[self.PATIENTS], self.RECONCILIATION: reconciliation}
