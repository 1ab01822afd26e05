"""The output contract: the Arrow schemas of the three tables the pipeline writes.

``OUT/slices/``          one row per decoded DICOM slice (SLICE_SCHEMA)
``OUT/reconciliation/``  one row per matched patient and per problem found
``OUT/errors/``          one row per input that could not be used

Every field carries its description as field metadata (``description``), so
the schema read back from any shard documents itself. The slice table's
columns are declared in ``columns``; docs/OUTPUT.md's tables are checked against
these definitions by the tests.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from transforms.contract.columns import SLICE_COLUMNS, Column

SCHEMA_VERSION = '3'

SLICES_DIR = 'slices'
RECONCILIATION_DIR = 'reconciliation'
ERRORS_DIR = 'errors'
# The run record of the layout before schema 3 (plain Parquet folders), named
# here so that such an output is recognised and replaced, never misread.
SUMMARY_FILE = '_SUMMARY.json'
STAGING_DIR = '_incomplete'
# Written into the staging folder by the duplicate search, applied and
# removed by the launcher before publishing.
DUPLICATES_PLAN_FILE = '_DUPLICATES.json'

# Reconciliation statuses, in the order the summary prints them.
MATCHED = 'matched'
MISSING_DICOMS = 'missing_dicoms'
MISSING_CONTOURS = 'missing_contours'
UNLINKED_DICOMS = 'unlinked_dicoms'
UNLINKED_CONTOURS = 'unlinked_contours'
CONTOUR_WITHOUT_DICOM = 'contour_without_dicom'
DUPLICATE_LINK = 'duplicate_link'
MALFORMED_LINK = 'malformed_link'
DUPLICATE_SLICE = 'duplicate_slice'
DUPLICATE_CONTOUR = 'duplicate_contour'
AMBIGUOUS_SERIES = 'ambiguous_series'  # a PACS patient with several series
STATUSES = (
  MATCHED,
  MISSING_DICOMS,
  MISSING_CONTOURS,
  UNLINKED_DICOMS,
  UNLINKED_CONTOURS,
  CONTOUR_WITHOUT_DICOM,
  DUPLICATE_LINK,
  MALFORMED_LINK,
  DUPLICATE_SLICE,
  DUPLICATE_CONTOUR,
  AMBIGUOUS_SERIES,
)

# Stages of the errors table.
STAGE_LINKS = 'links'
STAGE_LIST = 'list'
STAGE_SEARCH = 'search'  # a DICOMweb search, or an instance it found
STAGE_FETCH = 'fetch'  # a DICOMweb retrieve
STAGE_READ = 'read'
STAGE_DECODE = 'decode'
STAGE_CONTOUR = 'contour'
STAGE_EXCLUDED = 'excluded'  # a slice left out by choice (--exclude-burned-in)
STAGES = (
  STAGE_LINKS,
  STAGE_LIST,
  STAGE_SEARCH,
  STAGE_FETCH,
  STAGE_READ,
  STAGE_DECODE,
  STAGE_CONTOUR,
  STAGE_EXCLUDED,
)


def _field(
  name: str, type_: pa.DataType, description: str, nullable: bool = True
) -> pa.Field:
  return Column(name, type_, description, nullable).field()


# Derived from the column table (transforms.contract.columns).
SLICE_SCHEMA = pa.schema(
  [column.field() for column in SLICE_COLUMNS],
  metadata={'cardiac_mri_schema_version': SCHEMA_VERSION},
)

RECONCILIATION_SCHEMA = pa.schema(
  [
    _field(
      'patient_id',
      pa.string(),
      'patient_id (from link.csv, or the folder name for unlinked dicoms)',
    ),
    _field(
      'original_id',
      pa.string(),
      'original_id (from link.csv, or the folder name for unlinked contours)',
    ),
    _field('status', pa.string(), 'one of: ' + ', '.join(STATUSES), False),
    _field(
      'detail',
      pa.string(),
      'what was found, with paths and line numbers',
      False,
    ),
  ]
)

ERROR_SCHEMA = pa.schema(
  [
    _field(
      'patient_id',
      pa.string(),
      'the patient (or original id) the input belongs to, if known',
    ),
    _field('path', pa.string(), 'the input, relative to --input', False),
    _field('stage', pa.string(), 'one of: ' + ', '.join(STAGES), False),
    _field('error', pa.string(), 'why the input could not be used', False),
  ]
)


def reconciliation_row(
  patient_id: str, original_id: str, status: str, detail: str
) -> dict:
  """A row of the reconciliation table."""
  return {
    'patient_id': patient_id,
    'original_id': original_id,
    'status': status,
    'detail': detail,
  }


def error_row(patient_id: str, path: str, stage: str, error: str) -> dict:
  """A row of the errors (dead-letter) table."""
  return {
    'patient_id': patient_id,
    'path': path,
    'stage': stage,
    'error': error,
  }


def has_mask(table: pa.Table) -> pa.ChunkedArray:
  """Per row of a slice table: whether it is labeled (has an i or o mask)."""
  return pc.or_(pc.is_valid(table['i_mask']), pc.is_valid(table['o_mask']))
