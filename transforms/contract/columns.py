"""Every column of the slice table (``OUT/slices/``), each declared once.

A Column says its name, Arrow type, whether it may be null, and what it means.
A column copied from the DICOM header also says where it comes from: the
DICOM keyword, tag and VR (``Column.dicom``). Everything else is derived from
this table: the Arrow schema (``schema.SLICE_SCHEMA``, whose fields carry the
descriptions), pydicom's extractor (``transforms.decode.dicom``), the native reader's
tag set (``transforms.decode._native``) and the column table of docs/OUTPUT.md
(:func:`markdown_table`, held to it by ``tests/test_docs.py``).

The header columns are an allow-list: each says what DICOM PS3.15 Annex E's
Basic Application Level Confidentiality Profile does with its attribute
(``DicomSource.action``): ``K``, kept (the profile does not list it), or
``U``, replaced by a consistent UID. ``tests/test_privacy.py`` checks every
one against the profile's table, so a column of names, dates, ids or
private tags cannot be added.

Adding a header column is one ``_header(...)`` line in HEADER_COLUMNS.
"""

from __future__ import annotations

from typing import NamedTuple

import pyarrow as pa

# What PS3.15 Annex E's Basic Profile does with an output attribute.
KEEP = 'K'  # not listed by the profile: kept
REPLACE_UID = 'U'  # replaced by a non-zero-length UID, consistent in the set


class DicomSource(NamedTuple):
  """Where a header column's value comes from."""

  keyword: str  # pydicom's keyword, e.g. 'SOPInstanceUID'
  tag: int  # e.g. 0x00080018
  vr: str  # the value representation, e.g. 'UI'
  action: str = KEEP  # KEEP or REPLACE_UID (see the module docstring)

  @property
  def in_file_meta(self) -> bool:
    """True for a File Meta Information element (group 0002)."""
    return self.tag >> 16 == 0x0002


class Column(NamedTuple):
  """One column of the slice table."""

  name: str
  type: pa.DataType
  description: str
  nullable: bool = True
  dicom: DicomSource | None = None
  # How many values a list of header values holds (e.g. 2 for PixelSpacing);
  # 0 for a scalar. The Arrow type is a plain list: Delta Lake has no
  # fixed-size lists, and Polars refuses a table whose files disagree with
  # its Delta schema.
  values: int = 0

  def field(self) -> pa.Field:
    """The Arrow field, with the description as field metadata."""
    return pa.field(
      self.name,
      self.type,
      nullable=self.nullable,
      metadata={'description': self.description},
    )


def _column(
  name: str, type_: pa.DataType, description: str, nullable: bool = True
) -> Column:
  return Column(name, type_, description, nullable)


def _header(
  name: str,
  keyword: str,
  tag: int,
  vr: str,
  type_: pa.DataType,
  note: str = '',
  nullable: bool = True,
  action: str = KEEP,
  values: int = 0,
) -> Column:
  """A column copied from the header; its description starts with the keyword
  and, for data set elements, the tag, e.g. "Rows (0028,0010): image height".
  ``values``: a list of that many values (type_ is then the value type)."""
  source = DicomSource(keyword, tag, vr, action)
  where = '' if source.in_file_meta else f' ({tag >> 16:04X},{tag & 0xFFFF:04X})'
  if values:
    type_ = pa.list_(type_)
  return Column(name, type_, f'{keyword}{where}{note}', nullable, source, values)


_DOUBLES = pa.float64()

IDENTITY_COLUMNS = (
  _column(
    'patient_id',
    pa.string(),
    'patient_id from link.csv (its pseudonym with --pseudonymize-key-file)',
    False,
  ),
  _column(
    'original_id',
    pa.string(),
    'original_id from link.csv (its pseudonym with --pseudonymize-key-file)',
    False,
  ),
  _column('slice_index', pa.int32(), 'n of dicoms/<patient_id>/<n>.dcm', False),
  _column(
    'split',
    pa.string(),
    'train, val or test: a stable hash of the patient_id as written in '
    'link.csv against --split, every non-zero split filled in small cohorts, '
    'a patient already in the dataset keeping its split (docs/TRAINING.md)',
    False,
  ),
  _column(
    'dicom_path',
    pa.string(),
    'path of the .dcm file relative to --input, or its WADO-RS path on a PACS '
    '(ids and UIDs in it pseudonymised with a key)',
    False,
  ),
)

# The header columns, in table order: an allow-list. No identifying tag
# (names, dates, addresses, other ids, institutions) may be added here: the
# patient is known by the ids in link.csv (tests/test_privacy.py).
_UID = {'action': REPLACE_UID}
HEADER_COLUMNS = (
  _header('sop_instance_uid', 'SOPInstanceUID', 0x00080018, 'UI', pa.string(), **_UID),
  _header(
    'series_instance_uid', 'SeriesInstanceUID', 0x0020000E, 'UI', pa.string(), **_UID
  ),
  _header(
    'study_instance_uid', 'StudyInstanceUID', 0x0020000D, 'UI', pa.string(), **_UID
  ),
  _header('modality', 'Modality', 0x00080060, 'CS', pa.string(), ', e.g. MR'),
  _header(
    'transfer_syntax_uid',
    'TransferSyntaxUID',
    0x00020010,
    'UI',
    pa.string(),
    ' of the file as stored',
  ),
  _header('instance_number', 'InstanceNumber', 0x00200013, 'IS', pa.int32()),
  _header('rows', 'Rows', 0x00280010, 'US', pa.int32(), ': image height', False),
  _header('columns', 'Columns', 0x00280011, 'US', pa.int32(), ': image width', False),
  _header(
    'samples_per_pixel',
    'SamplesPerPixel',
    0x00280002,
    'US',
    pa.int32(),
    ': 1 for MR; 3 for colour images',
    False,
  ),
  _header(
    'photometric_interpretation',
    'PhotometricInterpretation',
    0x00280004,
    'CS',
    pa.string(),
    ', e.g. MONOCHROME2',
  ),
  _header('bits_allocated', 'BitsAllocated', 0x00280100, 'US', pa.int32()),
  _header('bits_stored', 'BitsStored', 0x00280101, 'US', pa.int32()),
  _header(
    'pixel_representation',
    'PixelRepresentation',
    0x00280103,
    'US',
    pa.int32(),
    ': 0 unsigned, 1 signed',
  ),
  _header(
    'pixel_spacing',
    'PixelSpacing',
    0x00280030,
    'DS',
    _DOUBLES,
    ' in mm: [row spacing, column spacing]',
    values=2,
  ),
  _header('slice_thickness', 'SliceThickness', 0x00180050, 'DS', _DOUBLES, ' in mm'),
  _header('slice_location', 'SliceLocation', 0x00201041, 'DS', _DOUBLES, ' in mm'),
  _header(
    'image_position_patient',
    'ImagePositionPatient',
    0x00200032,
    'DS',
    _DOUBLES,
    ' in mm: [x, y, z]',
    values=3,
  ),
  _header(
    'image_orientation_patient',
    'ImageOrientationPatient',
    0x00200037,
    'DS',
    _DOUBLES,
    ': row and column cosines (6 values)',
    values=6,
  ),
  _header(
    'rescale_slope',
    'RescaleSlope',
    0x00281053,
    'DS',
    _DOUBLES,
    '; null when absent (then 1)',
  ),
  _header(
    'rescale_intercept',
    'RescaleIntercept',
    0x00281052,
    'DS',
    _DOUBLES,
    '; null when absent (then 0)',
  ),
  _header(
    'trigger_time', 'TriggerTime', 0x00181060, 'DS', _DOUBLES, ' in ms: cardiac phase'
  ),
)

PIXEL_DTYPE = _column(
  'pixel_dtype',
  pa.string(),
  'numpy dtype name of image, e.g. int16 (bytes are little-endian)',
  False,
)

IMAGE_COLUMNS = (
  _column(
    'image',
    pa.binary(),
    'pydicom pixel_array, no rescale, C order, little-endian bytes of '
    'pixel_dtype; shape (rows, columns), or (rows, columns, samples) '
    'when samples_per_pixel > 1',
    False,
  ),
  _column(
    'i_mask',
    pa.binary(),
    'inner (blood pool) mask: numpy.packbits of the row-major '
    '(rows, columns) booleans; null when the slice has no usable '
    'i-contour',
  ),
  _column(
    'o_mask',
    pa.binary(),
    'outer (myocardium) mask, packed like i_mask; null when the slice '
    'has no usable o-contour',
  ),
)


def _contour_quality(kind: str, name: str) -> tuple[Column, ...]:
  return (
    _column(f'{kind}_vertex_count', pa.int32(), f'vertices of the {name} contour'),
    _column(f'{kind}_polygon_area', _DOUBLES, f'shoelace area of the {name} contour'),
    _column(f'{kind}_mask_pixels', pa.int32(), f'pixels set in {kind}_mask'),
    _column(
      f'{kind}_vertices_outside',
      pa.int32(),
      f'{name} contour vertices outside [0, columns] x [0, rows]',
    ),
    _column(
      f'{kind}_self_intersecting', pa.bool_(), f'the {name} contour crosses itself'
    ),
  )


QUALITY_COLUMNS = (
  *_contour_quality('i', 'inner'),
  *_contour_quality('o', 'outer'),
  _column(
    'inner_in_outer',
    _DOUBLES,
    'fraction of i_mask pixels inside o_mask; null unless both masks exist',
  ),
  _column('pixel_min', _DOUBLES, 'smallest stored pixel value'),
  _column('pixel_max', _DOUBLES, 'largest stored pixel value'),
  _column(
    'pixel_xxh3',
    pa.string(),
    'XXH3-128 of the image bytes, 32 hex digits (xxhash.xxh3_128_hexdigest)',
    False,
  ),
  _column(
    'qa_flags',
    pa.list_(pa.string()),
    'quality flags raised for this slice (see README); empty when none',
    False,
  ),
)


def _before(columns: tuple[Column, ...], name: str, extra: Column) -> tuple:
  at = [c.name for c in columns].index(name)
  return (*columns[:at], extra, *columns[at:])


# Every column, in table order (pixel_dtype sits with the pixel description).
SLICE_COLUMNS = (
  *IDENTITY_COLUMNS,
  *_before(HEADER_COLUMNS, 'pixel_spacing', PIXEL_DTYPE),
  *IMAGE_COLUMNS,
  *QUALITY_COLUMNS,
)

# The columns a decoder returns as metadata: the header columns and pixel_dtype.
METADATA_NAMES = tuple(c.name for c in HEADER_COLUMNS) + (PIXEL_DTYPE.name,)
# The header columns whose UIDs are pseudonymised (action U) under a key.
REPLACED_UIDS = tuple(
  c.name for c in HEADER_COLUMNS if c.dicom and c.dicom.action == REPLACE_UID
)


def type_name(type_: pa.DataType) -> str:
  """A column type as docs/OUTPUT.md writes it, e.g. ``list<double>``."""
  if pa.types.is_list(type_):
    return f'list<{type_name(type_.value_type)}>'
  return {'float64': 'double', 'bool': 'bool'}.get(str(type_), str(type_))


def _markdown(text: str) -> str:
  """``text`` with every word holding ``<`` as code, so that Markdown
  shows it instead of taking it for an HTML tag."""
  return ' '.join(f'`{w}`' if '<' in w else w for w in text.split(' '))


def _type_text(type_: pa.DataType) -> str:
  name = type_name(type_)
  return f'`{name}`' if '<' in name else name


def markdown_table() -> str:
  """docs/OUTPUT.md's table of slice columns, one row per column."""
  lines = ['| column | type | PS3.15 | meaning |', '| --- | --- | --- | --- |']
  lines += [
    f'| `{c.name}` | {_type_text(c.type)} | {c.dicom.action if c.dicom else ""} | '
    f'{_markdown(c.description)} |'
    for c in SLICE_COLUMNS
  ]
  return '\n'.join(lines)


if __name__ == '__main__':
  print(markdown_table())
