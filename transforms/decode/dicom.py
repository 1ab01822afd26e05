"""One DICOM file's bytes to its metadata columns and image, with pydicom.

``decode_dicom`` is pure (bytes in, Decoded out) and raises DicomError for a
file that cannot be used. It decodes what the native reader
(``transforms.decode._native``) declines: compressed and unusual files. The
metadata it extracts is derived from the column table
(``transforms.contract.columns.HEADER_COLUMNS``).
"""

from __future__ import annotations

import io
import warnings
import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pydicom
import pydicom.config
import pydicom.filereader
from pydicom.errors import InvalidDicomError

from transforms.contract.columns import HEADER_COLUMNS, PIXEL_DTYPE, Column
from transforms.contract.errors import DicomError
from transforms.contract.flags import burned_in_risk
from transforms.decode import _native
from transforms.outcomes import Decoded
from transforms.settings import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS

_PIXEL_DATA = 0x7FE00010

# Uncompressed transfer syntaxes and their byte order.
_NATIVE_SYNTAXES = {
  pydicom.uid.ExplicitVRLittleEndian: '<',
  pydicom.uid.ImplicitVRLittleEndian: '<',
  pydicom.uid.ExplicitVRBigEndian: '>',
}
# Pixel Data stored as is (deflate compresses the data set, not the pixels):
# its length must match the header exactly (see _native.length_problem).
_UNCOMPRESSED = {*_NATIVE_SYNTAXES, pydicom.uid.DeflatedExplicitVRLittleEndian}


def _converter(column: Column) -> Callable:
  """How a header value becomes the column's Python type (per value)."""
  value_type = column.type.value_type if column.values else column.type
  if pa.types.is_integer(value_type):
    return int
  if pa.types.is_floating(value_type):
    return float
  return str


# (column name, keyword, in file meta, converter, values) per header column.
_EXTRACTORS = tuple(
  (c.name, c.dicom.keyword, c.dicom.in_file_meta, _converter(c), c.values)
  for c in HEADER_COLUMNS
)


def _value(ds: pydicom.Dataset, keyword: str, convert, count: int = 0):
  """A typed tag value, or None when absent, empty or malformed.

  pydicom parses an element when it is first read, and a malformed one (an
  unknown VR, a bad length) raises any of several types then: the column is
  null, as for a value that does not convert.
  """
  try:
    element = ds.get(keyword)
    if element is None or element == '':
      return None
    if count:  # -1: any number of values
      if isinstance(element, str | bytes) or not hasattr(element, '__iter__'):
        element = [element]  # one value
      values = [convert(v) for v in element]
      return values if count < 0 or len(values) == count else None
    return convert(element)
  except Exception:  # see the docstring
    return None


def header_values(ds: pydicom.Dataset) -> dict:
  """Every header column's typed value (None when absent or malformed)."""
  return {
    name: _value(ds.file_meta if meta else ds, keyword, convert, count)
    for name, keyword, meta, convert, count in _EXTRACTORS
  }


def native_pixels(
  ds: pydicom.Dataset, rows: int, columns: int, samples: int
) -> np.ndarray | None:
  """The pixels of a common uncompressed image (see :func:`_native.pixels`),
  or None for pydicom's decoder."""
  order = _NATIVE_SYNTAXES.get(ds.file_meta.get('TransferSyntaxUID'))
  if order is None or 'PixelData' not in ds:
    return None
  return _native.pixels(
    ds.PixelData,
    order,
    rows,
    columns,
    samples,
    ds.get('BitsAllocated'),
    ds.get('BitsStored'),
    ds.get('PixelRepresentation'),
  )


def stop_after_pixel_data() -> Callable[[int, str | None, int], bool]:
  """A pydicom ``stop_when`` that ends the top-level data set after Pixel Data.

  What may follow it (Data Set Trailing Padding, Digital Signatures, or junk)
  is never used, and parsing it cost pydicom about 0.25 s per MiB: a slice
  with enough of it would be lost to the decode timeout on a slow machine and
  kept on a fast one. Stopping makes the outcome independent of timing. The
  native reader stops at the same place. pydicom calls ``stop_when`` for the
  top-level elements only, so Pixel Data nested in an item (an icon image)
  does not stop it.
  """
  seen = False

  def stop(tag: int, vr: str | None, length: int) -> bool:
    nonlocal seen
    if seen:
      return True
    seen = tag == _PIXEL_DATA
    return False

  return stop


_INFLATE_STEP = 1 << 20


def inflated_size_problem(data: bytes, limit: int) -> str | None:
  """Why a Deflated Explicit VR data set cannot be inflated within ``limit``
  bytes, or None. Inflates in steps of 1 MiB and keeps none of it, so a
  3 MB file that inflates to 3 GiB costs 1 MiB here, not 3 GiB in pydicom."""
  meta = _native.file_meta(data)
  if meta is None or meta[0] != pydicom.uid.DeflatedExplicitVRLittleEndian:
    return None
  inflater = zlib.decompressobj(-zlib.MAX_WBITS)
  view = memoryview(data)[meta[1] :]
  total = 0
  try:
    for start in range(0, len(view), _INFLATE_STEP):
      pending = view[start : start + _INFLATE_STEP]
      while True:
        produced = len(inflater.decompress(pending, _INFLATE_STEP))
        total += produced
        if total > limit:
          return (
            f'the deflated data set inflates to more than {limit} bytes '
            '(--max-file-bytes); not inflated further'
          )
        pending = inflater.unconsumed_tail
        if inflater.eof:
          return None
        if not pending and produced < _INFLATE_STEP:
          break
  except zlib.error as e:
    return f'the deflated data set cannot be inflated: {e}'
  return None


def decode_dicom(
  data: bytes,
  max_pixels: int = DEFAULT_MAX_PIXELS,
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> Decoded:
  """Decodes one single-frame DICOM file.

  The file must start with the DICOM preamble and "DICM" prefix (pydicom's
  ``force`` is not used: a file without them is rejected, not guessed at).
  Compressed transfer syntaxes decode through pydicom's plugins. Parsing
  stops after the top-level Pixel Data (:func:`stop_after_pixel_data`).

  Args:
    data: the file's bytes.
    max_pixels: the largest rows x columns x samples x frames accepted,
      checked from the header before any pixel buffer is allocated.
    max_file_bytes: the largest size a deflated data set may inflate to,
      checked before pydicom inflates it.

  Returns:
    Decoded: the metadata columns, and pixel_array, unscaled, C-contiguous,
    little-endian.

  Raises:
    DicomError: with the reason the file cannot be used.
  """
  # Real trees hold UIDs with leading-zero components; pydicom would warn
  # once per file. Values are read as they are.
  pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
  problem = inflated_size_problem(data, max_file_bytes)
  if problem:
    raise DicomError(problem)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    try:
      ds = pydicom.filereader.read_partial(
        io.BytesIO(data), stop_when=stop_after_pixel_data()
      )
    except InvalidDicomError as e:
      raise DicomError(
        'not a DICOM file: no DICM prefix after the 128-byte preamble'
      ) from e
    except Exception as e:  # pydicom raises many types on corrupt headers.
      raise DicomError(f'unreadable DICOM header: {type(e).__name__}: {e}') from e
    missing = [k for k in ('Rows', 'Columns', 'PixelData') if k not in ds]
    if missing:
      raise DicomError(f'no {", ".join(missing)} in the dataset')
    meta = header_values(ds)
    rows, columns = meta['rows'], meta['columns']
    samples = meta['samples_per_pixel'] = meta['samples_per_pixel'] or 1
    frames = _value(ds, 'NumberOfFrames', int) or 1
    if not rows or not columns:
      raise DicomError(f'invalid image size {rows} x {columns}')
    if frames != 1:
      raise DicomError(
        f'multi-frame image ({frames} frames); only single-frame slices are supported'
      )
    if rows * columns * samples > max_pixels:
      raise DicomError(
        f'image of {rows} x {columns} x {samples} samples exceeds '
        f'--max-pixels {max_pixels}'
      )
    if ds.file_meta.get('TransferSyntaxUID') in _UNCOMPRESSED:
      problem = _native.length_problem(
        ds.PixelData or b'',  # an empty value reads as None
        rows,
        columns,
        samples,
        _value(ds, 'BitsAllocated', int),
        frames,
        ds['PixelData'].is_undefined_length,
      )
      if problem:
        raise DicomError(problem)
    try:
      image = native_pixels(ds, rows, columns, samples)
      if image is None:
        image = ds.pixel_array
    except Exception as e:  # Each pixel handler raises its own types.
      raise DicomError(f'pixel data cannot be decoded: {type(e).__name__}: {e}') from e
    expected = (rows, columns) if samples == 1 else (rows, columns, samples)
    if image.shape != expected:
      raise DicomError(
        f'decoded shape {image.shape} does not match the header {expected}'
      )
    image = np.ascontiguousarray(
      image.astype(image.dtype.newbyteorder('<'), copy=False)
    )
    meta[PIXEL_DTYPE.name] = image.dtype.name
  risk = burned_in_risk(
    _value(ds, 'BurnedInAnnotation', str),
    _value(ds, 'ImageType', str, -1),
    _value(ds, 'SOPClassUID', str),
  )
  return Decoded(meta, image, len(data), risk)
