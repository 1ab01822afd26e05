"""The output contract: the Arrow schemas of the three tables the pipeline writes.

``OUT/slices/``          one row per decoded DICOM slice (SLICE_SCHEMA)
``OUT/reconciliation/``  one row per matched patient and per problem found
``OUT/errors/``          one row per input that could not be used

Every field carries its description as field metadata (``description``), so
the schema read back from any shard documents itself. The README's table is
checked against these definitions by the tests.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = '2'

SLICES_DIR = 'slices'
RECONCILIATION_DIR = 'reconciliation'
ERRORS_DIR = 'errors'
SUMMARY_FILE = '_SUMMARY.json'
STAGING_DIR = '_incomplete'

# Reconciliation statuses, in the order the summary prints them.
MATCHED = 'matched'
MISSING_DICOMS = 'missing_dicoms'
MISSING_CONTOURS = 'missing_contours'
UNLINKED_DICOMS = 'unlinked_dicoms'
UNLINKED_CONTOURS = 'unlinked_contours'
CONTOUR_WITHOUT_DICOM = 'contour_without_dicom'
DUPLICATE_LINK = 'duplicate_link'
MALFORMED_LINK = 'malformed_link'
STATUSES = (
  MATCHED,
  MISSING_DICOMS,
  MISSING_CONTOURS,
  UNLINKED_DICOMS,
  UNLINKED_CONTOURS,
  CONTOUR_WITHOUT_DICOM,
  DUPLICATE_LINK,
  MALFORMED_LINK,
)

# Stages of the errors table.
STAGE_LINKS = 'links'
STAGE_LIST = 'list'
STAGE_READ = 'read'
STAGE_DECODE = 'decode'
STAGE_CONTOUR = 'contour'
STAGES = (STAGE_LINKS, STAGE_LIST, STAGE_READ, STAGE_DECODE, STAGE_CONTOUR)


def _field(
  name: str, type_: pa.DataType, description: str, nullable: bool = True
) -> pa.Field:
  return pa.field(name, type_, nullable=nullable, metadata={'description': description})


SLICE_FIELDS = (
  _field('patient_id', pa.string(), 'patient_id from link.csv', False),
  _field('original_id', pa.string(), 'original_id from link.csv', False),
  _field('slice_index', pa.int32(), 'n of dicoms/<patient_id>/<n>.dcm', False),
  _field(
    'split',
    pa.string(),
    'train, val or test: a stable hash of patient_id against --split',
    False,
  ),
  _field(
    'dicom_path',
    pa.string(),
    'path of the .dcm file, relative to --input',
    False,
  ),
  _field('sop_instance_uid', pa.string(), 'SOPInstanceUID (0008,0018)'),
  _field('series_instance_uid', pa.string(), 'SeriesInstanceUID (0020,000E)'),
  _field('study_instance_uid', pa.string(), 'StudyInstanceUID (0020,000D)'),
  _field('modality', pa.string(), 'Modality (0008,0060), e.g. MR'),
  _field(
    'transfer_syntax_uid',
    pa.string(),
    'TransferSyntaxUID of the file as stored',
  ),
  _field('instance_number', pa.int32(), 'InstanceNumber (0020,0013)'),
  _field('rows', pa.int32(), 'Rows (0028,0010): image height', False),
  _field('columns', pa.int32(), 'Columns (0028,0011): image width', False),
  _field(
    'samples_per_pixel',
    pa.int32(),
    'SamplesPerPixel (0028,0002): 1 for MR; 3 for colour images',
    False,
  ),
  _field(
    'photometric_interpretation',
    pa.string(),
    'PhotometricInterpretation (0028,0004), e.g. MONOCHROME2',
  ),
  _field('bits_allocated', pa.int32(), 'BitsAllocated (0028,0100)'),
  _field('bits_stored', pa.int32(), 'BitsStored (0028,0101)'),
  _field(
    'pixel_representation',
    pa.int32(),
    'PixelRepresentation (0028,0103): 0 unsigned, 1 signed',
  ),
  _field(
    'pixel_dtype',
    pa.string(),
    'numpy dtype name of image, e.g. int16 (bytes are little-endian)',
    False,
  ),
  _field(
    'pixel_spacing',
    pa.list_(pa.float64(), 2),
    'PixelSpacing (0028,0030) in mm: [row spacing, column spacing]',
  ),
  _field('slice_thickness', pa.float64(), 'SliceThickness (0018,0050) in mm'),
  _field('slice_location', pa.float64(), 'SliceLocation (0020,1041) in mm'),
  _field(
    'image_position_patient',
    pa.list_(pa.float64(), 3),
    'ImagePositionPatient (0020,0032) in mm',
  ),
  _field(
    'image_orientation_patient',
    pa.list_(pa.float64(), 6),
    'ImageOrientationPatient (0020,0037): row and column cosines',
  ),
  _field(
    'rescale_slope',
    pa.float64(),
    'RescaleSlope (0028,1053); null when absent (then 1)',
  ),
  _field(
    'rescale_intercept',
    pa.float64(),
    'RescaleIntercept (0028,1052); null when absent (then 0)',
  ),
  _field('trigger_time', pa.float64(), 'TriggerTime (0018,1060) in ms: cardiac phase'),
  _field(
    'image',
    pa.binary(),
    'pydicom pixel_array, no rescale, C order, little-endian bytes of '
    'pixel_dtype; shape (rows, columns), or (rows, columns, samples) '
    'when samples_per_pixel > 1',
    False,
  ),
  _field(
    'i_mask',
    pa.binary(),
    'inner (blood pool) mask: numpy.packbits of the row-major '
    '(rows, columns) booleans; null when the slice has no usable '
    'i-contour',
  ),
  _field(
    'o_mask',
    pa.binary(),
    'outer (myocardium) mask, packed like i_mask; null when the slice '
    'has no usable o-contour',
  ),
)


def _contour_quality_fields(kind: str, name: str) -> tuple[pa.Field, ...]:
  return (
    _field(f'{kind}_vertex_count', pa.int32(), f'vertices of the {name} contour'),
    _field(
      f'{kind}_polygon_area', pa.float64(), f'shoelace area of the {name} contour'
    ),
    _field(f'{kind}_mask_pixels', pa.int32(), f'pixels set in {kind}_mask'),
    _field(
      f'{kind}_vertices_outside',
      pa.int32(),
      f'{name} contour vertices outside [0, columns] x [0, rows]',
    ),
    _field(
      f'{kind}_self_intersecting', pa.bool_(), f'the {name} contour crosses itself'
    ),
  )


QUALITY_FIELDS = (
  *_contour_quality_fields('i', 'inner'),
  *_contour_quality_fields('o', 'outer'),
  _field(
    'inner_in_outer',
    pa.float64(),
    'fraction of i_mask pixels inside o_mask; null unless both masks exist',
  ),
  _field('pixel_min', pa.float64(), 'smallest stored pixel value'),
  _field('pixel_max', pa.float64(), 'largest stored pixel value'),
  _field(
    'pixel_xxh3',
    pa.string(),
    'XXH3-128 of the image bytes, 32 hex digits (xxhash.xxh3_128_hexdigest)',
    False,
  ),
  _field(
    'qa_flags',
    pa.list_(pa.string()),
    'quality flags raised for this slice (see README); empty when none',
    False,
  ),
)

SLICE_SCHEMA = pa.schema(
  SLICE_FIELDS + QUALITY_FIELDS, metadata={'cardiac_mri_schema_version': SCHEMA_VERSION}
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
