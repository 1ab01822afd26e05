"""A small reader for the common DICOM slice: uncompressed, little endian.

pydicom builds a full Dataset (every element, converted) before we read twenty
of them; on a 256 x 256 slice that is most of the decoding time. ``decode``
walks the elements itself, keeps the raw bytes of the tags SLICE_SCHEMA needs,
and takes the pixels with ``numpy.frombuffer``.

It is a fast path, never a second opinion: it returns None for anything it is
not sure to read exactly as ``dicom.decode_dicom`` (pydicom) does, and the
caller then uses pydicom, which also gives the precise error for a bad file.
None is returned for: big-endian or compressed transfer syntaxes, elements
that overrun the file, unknown or unexpected VRs, a repeated tag, sequences
nested deeper than MAX_DEPTH, a value in a form pydicom might convert
differently (multi-valued where one is expected, numbers outside a strict
syntax), and every image decode_dicom would reject. tests/test_native.py
compares both readers on pydicom's test files, generated trees and fuzzed
bytes.

It cannot crash or hang the worker: pure Python and numpy over bytes already
in memory, every loop advances through the buffer or stops, and nothing is
allocated beyond one copy of the pixels, so it runs in-process even when
pydicom's decoders are isolated in a child (see transforms.decode._isolate).
"""

from __future__ import annotations

import re
import struct

import numpy as np

from transforms.contract.columns import HEADER_COLUMNS, METADATA_NAMES, PIXEL_DTYPE
from transforms.contract.flags import burned_in_risk
from transforms.outcomes import Decoded

MAX_DEPTH = 8
EXPLICIT_LE = '1.2.840.10008.1.2.1'
IMPLICIT_LE = '1.2.840.10008.1.2'

# VRs with a 2-byte reserved field and a 4-byte length in explicit VR.
_LONG_VRS = frozenset(b'OB OD OF OL OV OW SQ SV UC UN UR UT UV'.split())
_SHORT_VRS = frozenset(
  b'AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US'.split()
)
_VRS = _SHORT_VRS | _LONG_VRS
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_TRANSFER_SYNTAX = 0x00020010

# How a value of each VR is converted; a header column of any other VR makes
# this reader decline the file (pydicom then reads it).
_KIND_OF_VR = {b'US': 'us', b'IS': 'int', b'DS': 'float', b'UI': 'str', b'CS': 'str'}

# tag -> (column or internal name, VR, kind, count), derived from the column
# table; kind says how to convert. The transfer syntax comes from the file meta.
_TAGS = {
  c.dicom.tag: (
    c.name,
    c.dicom.vr.encode(),
    _KIND_OF_VR.get(c.dicom.vr.encode(), 'unsure'),
    c.values,
  )
  for c in HEADER_COLUMNS
  if not c.dicom.in_file_meta
}
_TAGS[0x00280008] = ('frames', b'IS', 'int', 0)  # NumberOfFrames: checked, not stored
# Read for the burned-in text risk (flags.burned_in_risk), not stored.
_TAGS[0x00280301] = ('burned_in_annotation', b'CS', 'str', 0)
_TAGS[0x00080008] = ('image_type', b'CS', 'strs', 0)
_TAGS[0x00080016] = ('sop_class_uid', b'UI', 'str', 0)
_RISK_NAMES = ('burned_in_annotation', 'image_type', 'sop_class_uid')
_TAGS[_PIXEL_DATA] = ('pixels', None, 'bytes', 0)
_INT = re.compile(r' *[+-]?[0-9]{1,9} *')
_FLOAT = re.compile(r' *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})? *')
_UNSURE = object()


class _Unsupported(Exception):
  """The file is not one this reader is sure to read like pydicom."""


def _header(
  data: bytes, pos: int, explicit: bool
) -> tuple[int, bytes | None, int, int]:
  """The element header at ``pos``: (tag, VR or None, value length, value pos)."""
  if pos + 8 > len(data):
    raise _Unsupported
  group, number = struct.unpack_from('<HH', data, pos)
  tag = group << 16 | number
  if group == 0xFFFE or not explicit:  # item tags never carry a VR
    (length,) = struct.unpack_from('<I', data, pos + 4)
    return tag, None, length, pos + 8
  vr = data[pos + 4 : pos + 6]
  if vr in _SHORT_VRS:
    (length,) = struct.unpack_from('<H', data, pos + 6)
    return tag, vr, length, pos + 8
  if vr in _LONG_VRS:
    if pos + 12 > len(data):
      raise _Unsupported
    (length,) = struct.unpack_from('<I', data, pos + 8)
    return tag, vr, length, pos + 12
  raise _Unsupported


def _skip_undefined(data: bytes, pos: int, explicit: bool, depth: int) -> int:
  """Skips a sequence of undefined length starting at ``pos``; returns the end."""
  if depth > MAX_DEPTH:
    raise _Unsupported
  while True:
    tag, _, length, pos = _header(data, pos, explicit)
    if tag == _SEQUENCE_END:
      return pos
    if tag != _ITEM:
      raise _Unsupported
    if length != _UNDEFINED:
      pos += length
      continue
    while True:  # the item's elements, up to its delimiter
      tag, vr, length, pos = _header(data, pos, explicit)
      if tag == _ITEM_END:
        break
      if length == _UNDEFINED:
        if vr not in (None, b'SQ', b'UN'):
          raise _Unsupported
        pos = _skip_undefined(data, pos, explicit and vr != b'UN', depth + 1)
      else:
        pos += length
      if pos > len(data):
        raise _Unsupported


def _elements(data: bytes, pos: int, explicit: bool, end: int | None = None) -> dict:
  """The raw values of _TAGS (tag -> (VR, bytes)) from ``pos`` to ``end``, or
  to the end of Pixel Data: what follows it is never parsed (see
  ``dicom.stop_after_pixel_data``)."""
  elements = {}
  end = len(data) if end is None else end
  while pos < end:
    tag, vr, length, pos = _header(data, pos, explicit)
    if tag >> 16 == 0xFFFE:
      raise _Unsupported  # an item or delimiter outside any sequence
    if length == _UNDEFINED:
      if tag == _PIXEL_DATA or vr not in (None, b'SQ', b'UN'):
        raise _Unsupported  # encapsulated pixels, or not a sequence
      # An undefined-length UN holds a sequence in implicit VR (PS3.5 6.2.2).
      pos = _skip_undefined(data, pos, explicit and vr != b'UN', 1)
      continue
    if pos + length > end:
      raise _Unsupported
    if tag in _TAGS:
      if tag in elements:
        raise _Unsupported
      # Pixel Data as a view: the image can then be a view of the file's bytes.
      value = memoryview(data)[pos : pos + length] if tag == _PIXEL_DATA else None
      elements[tag] = vr, data[pos : pos + length] if value is None else value
    pos += length
    if tag == _PIXEL_DATA:
      break
  return elements


def file_meta(data: bytes) -> tuple[str | None, int] | None:
  """(transfer syntax UID, position of the data set) from a file's meta
  group, or None when it is not one this reader can walk."""
  try:
    return _file_meta(data)
  except _Unsupported:
    return None


def _file_meta(data: bytes) -> tuple[str | None, int]:
  if len(data) < 132 or data[128:132] != b'DICM':
    raise _Unsupported
  pos = 132
  syntax = None
  while pos + 8 <= len(data) and data[pos : pos + 2] == b'\x02\x00':
    tag, _, length, value = _header(data, pos, explicit=True)
    if length == _UNDEFINED or value + length > len(data):
      raise _Unsupported
    if tag == _TRANSFER_SYNTAX:
      syntax = data[value : value + length].decode('latin-1').rstrip(' \x00')
    pos = value + length
  return syntax, pos


def _convert(tag: int, vr: bytes | None, raw: bytes):
  """A tag's value as decode_dicom returns it, None if empty, or _UNSURE."""
  _, expected_vr, kind, count = _TAGS[tag]
  if kind == 'unsure' or (vr is not None and kind != 'bytes' and vr != expected_vr):
    return _UNSURE
  if kind == 'bytes':
    return raw
  if kind == 'us':
    return struct.unpack('<H', raw)[0] if len(raw) == 2 else _UNSURE
  text = raw.decode('latin-1').rstrip(' \x00')
  if not text:
    return None
  values = text.split('\\')
  if kind == 'strs':  # any number of values
    return values
  if len(values) != max(count, 1):
    return _UNSURE
  if kind == 'str':
    return text
  pattern, convert = (_INT, int) if kind == 'int' else (_FLOAT, float)
  if not all(pattern.fullmatch(v) for v in values):
    return _UNSURE
  converted = [convert(v) for v in values]
  return converted if count else converted[0]


def _is_item_chain(raw: bytes) -> bool:
  """True when ``raw`` parses whole as encapsulated items: (FFFE,E000) items
  end to end, optionally closed by a sequence delimiter. Real pixels that
  merely begin with those four bytes do not chain to the exact end."""
  pos = 0
  while pos + 8 <= len(raw):
    group, element, length = struct.unpack_from('<HHI', raw, pos)
    tag = group << 16 | element
    if tag == _SEQUENCE_END:
      return length == 0 and pos + 8 == len(raw)
    if tag != _ITEM or length == _UNDEFINED:
      return False
    pos += 8 + length
  return pos == len(raw) and pos > 0


def length_problem(
  raw: bytes,
  rows: int,
  columns: int,
  samples: int,
  allocated: int | None,
  frames: int = 1,
  undefined_length: bool = False,
) -> str | None:
  """Why uncompressed Pixel Data does not hold exactly the image its header
  describes, or None when it does.

  The value must be rows x columns x samples x frames x BitsAllocated bits,
  rounded up to whole bytes, plus at most the one padding byte that makes an
  odd length even. Encapsulated (fragmented) data, which belongs only to
  compressed transfer syntaxes, is refused whether its length is undefined
  or it hides behind a defined one.
  """
  if undefined_length or _is_item_chain(raw):
    return (
      'encapsulated (fragmented) pixel data under an uncompressed transfer '
      'syntax: its item tags would be read as pixels'
    )
  if not allocated or allocated < 1:
    return f'BitsAllocated is {allocated!r}: the pixel data size is unknown'
  expected = (rows * columns * samples * frames * allocated + 7) // 8
  described = (
    f'{rows} x {columns} x {samples} sample(s) x {frames} frame(s) x '
    f'{allocated} bits = {expected} bytes'
  )
  if len(raw) < expected:
    return f'pixel data holds {len(raw)} bytes; the header describes {described}'
  if len(raw) > expected + expected % 2:
    return (
      f'pixel data holds {len(raw)} bytes, {len(raw) - expected} more than the '
      f'header describes ({described}); at most 1 byte of padding is allowed'
    )
  return None


def pixels(
  raw: bytes,
  order: str,
  rows: int,
  columns: int,
  samples: int,
  allocated: int | None,
  stored: int | None,
  signed: int | None,
) -> np.ndarray | None:
  """The image of one uncompressed frame straight from its bytes.

  Equal to pydicom's ``pixel_array`` for one frame, one sample, 8/16/32-bit
  integers; unused high bits are masked (unsigned) or sign-extended (signed)
  exactly as pydicom does. Anything else returns None.

  Args:
    raw: the Pixel Data value.
    order: '<' or '>', the transfer syntax's byte order.
    rows, columns, samples: from the header.
    allocated, stored, signed: BitsAllocated, BitsStored (None or 0 means
      all allocated bits) and PixelRepresentation.
  """
  stored = stored or allocated
  if (
    samples != 1
    or allocated not in (8, 16, 32)
    or signed not in (0, 1)
    or not 0 < stored <= allocated
    or (order == '>' and allocated == 8)  # OW words are swapped in pairs
  ):
    return None
  dtype = np.dtype(f'{order}{"i" if signed else "u"}{allocated // 8}')
  if length_problem(raw, rows, columns, samples, allocated):
    return None  # decode_dicom gives the error, with the numbers
  image = np.frombuffer(raw, dtype, count=rows * columns).reshape(rows, columns)
  if order != '<':
    image = image.astype(dtype.newbyteorder('<'))
  # Otherwise a read-only view of ``raw``: no copy of the pixels until they
  # go into the Arrow table.
  unused = allocated - stored
  if unused and signed:
    image = (image << unused) >> unused
  elif unused:
    image = image & np.array((1 << stored) - 1, image.dtype)
  return image


def decode(data: bytes, max_pixels: int) -> Decoded | None:
  """Decoded exactly as ``dicom.decode_dicom`` returns it, or None.

  See the module docstring for when None is returned.
  """
  try:
    syntax, pos = _file_meta(data)
    if syntax not in (EXPLICIT_LE, IMPLICIT_LE):
      return None
    explicit = syntax == EXPLICIT_LE
    if not explicit and data[pos + 4 : pos + 6] in _VRS:
      return None  # pydicom would read this "implicit" data set as explicit
    elements = _elements(data, pos, explicit)
  except _Unsupported:
    return None
  values = {}
  for tag, (vr, raw) in elements.items():
    value = _convert(tag, vr, raw)
    if value is _UNSURE:
      return None
    values[_TAGS[tag][0]] = value
  rows, columns = values.get('rows'), values.get('columns')
  samples = values.get('samples_per_pixel') or 1
  raw = values.pop('pixels', None)
  if (
    raw is None
    or not rows
    or not columns
    or (values.pop('frames', None) or 1) != 1
    or rows * columns * samples > max_pixels
  ):
    return None
  image = pixels(
    raw,
    '<',
    rows,
    columns,
    samples,
    values.get('bits_allocated'),
    values.get('bits_stored'),
    values.get('pixel_representation'),
  )
  if image is None:
    return None
  risk = burned_in_risk(*(values.pop(name, None) for name in _RISK_NAMES))
  meta = dict.fromkeys(METADATA_NAMES)
  meta.update(values)
  meta['transfer_syntax_uid'] = syntax
  meta['samples_per_pixel'] = samples
  meta[PIXEL_DTYPE.name] = image.dtype.name
  return Decoded(meta, image, len(data), risk)


_SOP_INSTANCE_UID = 0x00080018
_DEFLATED_LE = '1.2.840.10008.1.2.1.99'


def instance_uid(head: bytes) -> str | None:
  """The data set's SOP Instance UID (0008,0018) from the first bytes of a
  DICOM file (PS3.10: preamble, meta group, data set), or None when it is
  not among them or the data set is not little endian (a deflated one is
  inflated as far as needed; big endian is not read).

  Read from the data set, not the meta group's copy (0002,0003): it is the
  UID a server indexes the instance by, and a file whose two copies differ
  is then never taken for another instance.
  """
  import zlib

  try:
    syntax, pos = _file_meta(head)
    data = head
    if syntax == _DEFLATED_LE:
      # The head may end mid-stream: inflate what is there, at most 64 KB.
      data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(head[pos:], 65536)
      pos, syntax = 0, EXPLICIT_LE
    if syntax is None or syntax == '1.2.840.10008.1.2.2':  # explicit big endian
      return None
    explicit = syntax != IMPLICIT_LE  # the encapsulated syntaxes are explicit LE
    while pos < len(data):
      tag, vr, length, pos = _header(data, pos, explicit)
      if tag > _SOP_INSTANCE_UID or length == _UNDEFINED:
        return None  # past it, or a sequence before it: not looked into
      if pos + length > len(data):
        return None
      if tag == _SOP_INSTANCE_UID:
        uid = data[pos : pos + length].decode('ascii').rstrip(' \x00')
        return uid or None
      pos += length
  except (_Unsupported, zlib.error, UnicodeDecodeError):
    return None
  return None
