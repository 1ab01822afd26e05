"""Reconciliation: link.csv against the data tree, joined with CoGroupByKey.

Only ids and paths travel through the joins; pixels are read later, per
patient, after the join (see ``transforms.decode``).

The data tree keys DICOM folders by patient_id and contour folders by
original_id, so there are two joins: contour files are attached to their link
row by original_id, then links meet DICOM files by patient_id.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from beam_pipeline import layout
from beam_pipeline import schema as s
from beam_pipeline.report import NAMESPACE
from transforms import _files

_LOG = logging.getLogger(__name__)

RECONCILIATION = 'reconciliation'
ERRORS = 'errors'


class Patient(NamedTuple):
  """A matched patient: its slices and, per slice, its contour paths."""

  patient_id: str
  original_id: str
  slices: tuple[layout.DicomFile, ...]  # sorted by slice_index
  contours: tuple[layout.ContourFile, ...]  # only those with a slice


class _Linked(NamedTuple):
  link: layout.Link
  contours: tuple[layout.ContourFile, ...]


class _ParseLinksFn(beam.DoFn):
  """Reads link.csv; emits Links, and problems as tagged outputs."""

  def __init__(self, input_root: str):
    self._input_root = input_root

  def process(self, relative_path: str):
    try:
      data = _files.read_input(self._input_root, relative_path)
    except OSError as e:
      yield pvalue.TaggedOutput(
        ERRORS,
        s.error_row('', relative_path, s.STAGE_LINKS, f'cannot read: {e}'),
      )
      return
    links, problems = layout.parse_links(data)
    _LOG.info('%s: %d links, %d problem rows', relative_path, len(links), len(problems))
    yield from links
    for problem in problems:
      yield pvalue.TaggedOutput(
        RECONCILIATION,
        s.reconciliation_row(
          problem.patient_id,
          problem.original_id,
          problem.status,
          problem.detail,
        ),
      )


class ReadLinks(beam.PTransform):
  """link.csv as Links (main output) and reconciliation/error rows (tagged)."""

  def __init__(self, input_root: str):
    super().__init__()
    self._input_root = input_root

  def expand(self, pbegin):
    return (
      pbegin
      | 'LinkFile' >> beam.Create([layout.LINK_FILE])
      | 'ParseLinks'
      >> beam.ParDo(_ParseLinksFn(self._input_root)).with_outputs(
        RECONCILIATION, ERRORS, main='links'
      )
    )


class _ClassifyFn(beam.DoFn):
  """Sorts listed files into DICOM slices, contour files and stray files."""

  DICOMS = 'dicoms'
  CONTOURS = 'contours'

  def __init__(self, input_root: str):
    self._input_root = input_root

  def setup(self):
    self._stray = Metrics.counter(NAMESPACE, 'stray_files')

  def process(self, listed: tuple[str, str | None]):
    path, problem = listed
    relative = _files.relative_to(self._input_root, path)
    if problem == _EMPTY_FOLDER and not layout.is_file_level(relative):
      found = None  # an empty patient folder is reported by the joins, if linked
    elif problem is not None:
      found = layout.StrayFile(layout.owner_of(relative), relative, problem)
    else:
      found = layout.classify_path(relative)
    if found is None:
      pass
    elif isinstance(found, layout.DicomFile):
      yield pvalue.TaggedOutput(self.DICOMS, found)
    elif isinstance(found, layout.ContourFile):
      yield pvalue.TaggedOutput(self.CONTOURS, found)
    else:
      self._stray.inc()
      yield pvalue.TaggedOutput(
        ERRORS,
        s.error_row(
          found.owner_id, found.path, s.STAGE_LIST, f'not used: {found.reason}'
        ),
      )


_EMPTY_FOLDER = 'empty folder'


def _walk_tops(root: str):
  for top in (layout.DICOM_DIR, layout.CONTOUR_DIR):
    folder = _files.join_path(root, top)
    if os.path.isdir(folder):
      yield from _files.walk_local(folder)


class ListTree(beam.PTransform):
  """Lists every file under dicoms/ and contourfiles/ and classifies it.

  Local trees are walked with os.scandir, which also reports what a glob
  would silently skip (unreadable or symlinked folders, special files);
  other file systems are listed with Beam's MatchAll.
  """

  def __init__(self, input_root: str):
    super().__init__()
    self._input_root = input_root

  def expand(self, pbegin):
    root = self._input_root
    if _files.is_local(root):
      listed = (
        pbegin | 'Root' >> beam.Create([root]) | 'Walk' >> beam.FlatMap(_walk_tops)
      )
    else:
      listed = (
        pbegin
        | 'Patterns'
        >> beam.Create(
          [
            _files.join_path(root, top) + '/**'
            for top in (layout.DICOM_DIR, layout.CONTOUR_DIR)
          ]
        )
        | 'MatchFiles' >> fileio.MatchAll()
        | 'Paths' >> beam.Map(lambda metadata: (metadata.path, None))
      )
    return listed | 'Classify' >> beam.ParDo(_ClassifyFn(root)).with_outputs(
      _ClassifyFn.DICOMS, _ClassifyFn.CONTOURS, ERRORS
    )


class _AttachContoursFn(beam.DoFn):
  """One original_id: its link row (if any) and its contour files."""

  def process(self, element):
    original_id, grouped = element
    links = list(grouped['links'])
    contours = tuple(sorted(grouped['contours']))
    if not links:
      yield pvalue.TaggedOutput(
        RECONCILIATION,
        s.reconciliation_row(
          '',
          original_id,
          s.UNLINKED_CONTOURS,
          f'{layout.CONTOUR_DIR}/{original_id}/ holds {len(contours)} contour '
          'files and no link.csv row names it',
        ),
      )
      return
    # parse_links leaves at most one link per original_id.
    link = links[0]
    yield link.patient_id, _Linked(link, contours)


class _MatchPatientsFn(beam.DoFn):
  """One patient_id: its link (with contours) and its DICOM files."""

  def process(self, element):
    patient_id, grouped = element
    linked = list(grouped['linked'])
    dicoms = sorted(grouped['dicoms'], key=lambda d: d.slice_index)
    if not linked:
      yield self._row(
        patient_id,
        '',
        s.UNLINKED_DICOMS,
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
        s.MISSING_CONTOURS,
        f'line {link.line}: no contour files under '
        f'{layout.CONTOUR_DIR}/{original_id}/'
        + (f'; its {len(dicoms)} slices are written unlabeled' if dicoms else ''),
      )
    if not dicoms:
      yield self._row(
        patient_id,
        original_id,
        s.MISSING_DICOMS,
        f'line {link.line}: no slices under {layout.DICOM_DIR}/{patient_id}/',
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
          s.CONTOUR_WITHOUT_DICOM,
          f'{contour.path}: no {layout.DICOM_DIR}/{patient_id}/'
          f'{contour.slice_index}.dcm',
        )
    kinds = [c.kind for c in usable]
    yield self._row(
      patient_id,
      original_id,
      s.MATCHED,
      f'{len(dicoms)} slices, {kinds.count("i")} i-contours, '
      f'{kinds.count("o")} o-contours',
    )
    yield Patient(patient_id, original_id, tuple(dicoms), tuple(usable))

  @staticmethod
  def _row(patient_id, original_id, status, detail):
    return pvalue.TaggedOutput(
      RECONCILIATION,
      s.reconciliation_row(patient_id, original_id, status, detail),
    )


class Reconcile(beam.PTransform):
  """link.csv and the data tree, reconciled.

  Returns a dict of PCollections: ``patients`` (matched Patients),
  ``reconciliation`` (report rows) and ``errors`` (dead-letter rows).
  """

  def __init__(self, input_root: str):
    super().__init__()
    self._input_root = input_root

  def expand(self, pbegin):
    links = pbegin | 'ReadLinks' >> ReadLinks(self._input_root)
    tree = pbegin | 'ListTree' >> ListTree(self._input_root)
    linked = (
      {
        'links': links.links
        | 'LinksByOriginalId' >> beam.Map(lambda link: (link.original_id, link)),
        'contours': tree[_ClassifyFn.CONTOURS]
        | 'ContoursByOriginalId' >> beam.Map(lambda c: (c.original_id, c)),
      }
      | 'JoinByOriginalId' >> beam.CoGroupByKey()
      | 'AttachContours'
      >> beam.ParDo(_AttachContoursFn()).with_outputs(RECONCILIATION, main='linked')
    )
    matched = (
      {
        'linked': linked.linked,
        'dicoms': tree[_ClassifyFn.DICOMS]
        | 'DicomsByPatient' >> beam.Map(lambda d: (d.patient_id, d)),
      }
      | 'JoinByPatient' >> beam.CoGroupByKey()
      | 'MatchPatients'
      >> beam.ParDo(_MatchPatientsFn()).with_outputs(RECONCILIATION, main='patients')
    )
    reconciliation = (
      links[RECONCILIATION],
      linked[RECONCILIATION],
      matched[RECONCILIATION],
    ) | 'AllReconciliation' >> beam.Flatten()
    errors = (links[ERRORS], tree[ERRORS]) | 'ListErrors' >> beam.Flatten()
    return {
      'patients': matched.patients,
      'reconciliation': reconciliation,
      'errors': errors,
    }
