"""What every source hands the rest of the graph: the same tagged outputs.

A source is a PTransform applied to the pipeline's beginning. Whatever it
reads (a tree of files, a PACS), it returns a dict with every tag below, so
the graph after it is one chain whatever the source is.
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam

from transforms.contract import layout


class Wording(NamedTuple):
  """How reconciliation rows say where a patient's slices were looked for:
  format strings over ``patient_id`` (and ``slice_index``)."""

  no_slices: str
  no_slice: str


TREE = Wording(
  f'no slices under {layout.DICOM_DIR}/{{patient_id}}/',
  f'no {layout.DICOM_DIR}/{{patient_id}}/{{slice_index}}.dcm',
)
PACS = Wording(
  'the DICOMweb server has no instance with PatientID {patient_id}',
  'no instance with InstanceNumber {slice_index} in the series of PatientID '
  '{patient_id}',
)


class Source(beam.PTransform):
  """The base of the sources; ``wording`` says in the reconciliation rows
  where the slices were looked for.

  Outputs (a dict):
    LINKS: layout.Link rows of link.csv.
    DICOMS, CONTOURS: layout.FileGroups of DicomFiles and ContourFiles.
    REPORTED: patient ids whose missing slices the source's own rows explain.
    RECONCILIATION, ERRORS: the source's report and error rows.
    ID_MAP: pseudonyms.Entry rows of what the source pseudonymised.
  """

  LINKS = 'links'
  DICOMS = 'dicoms'
  CONTOURS = 'contours'
  REPORTED = 'reported'
  RECONCILIATION = 'reconciliation'
  ERRORS = 'errors'
  ID_MAP = 'id_map'

  wording: Wording
