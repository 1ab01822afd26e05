"""The native reader (transforms.decode._native) against pydicom (decode_dicom).

Whenever the native reader returns a result, it must be exactly decode_dicom's:
the same metadata values and types, the same pixels and dtype. It may decline
(None) as often as it likes, but it must take the common files, or it is
useless.
"""

import glob
import io
import os
import re
import struct

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from beam_pipeline.tools import sample
from tests.helpers import fuzz_seeds, mutate
from transforms.contract.errors import DicomError
from transforms.decode import _native
from transforms.decode.dicom import decode_dicom
from transforms.settings import DEFAULT_MAX_PIXELS


def agree(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
  """True if the native reader took the file (and then matched pydicom)."""
  fast = _native.decode(data, max_pixels)
  if fast is None:
    return False
  meta, image, _, burned_in = decode_dicom(data, max_pixels)  # must not raise
  fast_meta, fast_image, fast_size, fast_burned_in = fast
  assert fast_size == len(data)
  assert fast_burned_in == burned_in
  assert fast_meta == meta
  assert {k: type(v) for k, v in fast_meta.items()} == {
    k: type(v) for k, v in meta.items()
  }
  assert fast_image.dtype == image.dtype and fast_image.flags.c_contiguous
  np.testing.assert_array_equal(fast_image, image)
  return True


def declines_or_agrees(data: bytes, label: object = None) -> bool:
  """agree() for a file pydicom reads; for one it rejects, the reader declines.

  Returns True if the native reader took the file.
  """
  try:
    decode_dicom(data)
  except Exception:
    assert _native.decode(data, DEFAULT_MAX_PIXELS) is None, label
    return False
  return agree(data)


def _generated(tmp_path, name='x.dcm', **changes) -> str:
  path = str(tmp_path / name)
  sample.write_dicom(path, sample.expected_image('P', 3, 12, 10), 'P', 3)
  if changes:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
      setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
  return path


def test_takes_every_good_generated_slice_and_declines_the_bad(tmp_path):
  root = tmp_path / 'DATA'
  manifest = sample.make_tree(str(root), patients=2, slices=6, quirks=['all'])
  taken = set()
  for path in glob.glob(str(root / 'dicoms' / '*' / '*.dcm')):
    if declines_or_agrees(open(path, 'rb').read(), path):
      patient, name = path.split(os.sep)[-2:]
      taken.add((patient, int(name.split('.')[0])))
  assert set(manifest.slices) <= taken


def test_matches_pydicom_on_its_own_test_files():
  folder = os.path.dirname(get_testdata_file('MR_small.dcm'))
  taken = []
  for path in sorted(glob.glob(os.path.join(folder, '*.dcm'))):
    if declines_or_agrees(open(path, 'rb').read(), path):
      taken.append(os.path.basename(path))
  # Explicit and implicit VR, 8 and 16 bits, with sequences and private tags;
  # the others are compressed, big endian, multi-frame, colour or 1-bit.
  expected = {'MR_small.dcm', 'MR_small_implicit.dcm', 'CT_small.dcm'}
  assert expected <= set(taken) and len(taken) >= 5, taken
  # MR_small_padded.dcm carries 128 bytes beyond its image: both readers
  # refuse it now (test_pixel_data_that_disagrees_with_the_header_*).
  assert 'MR_small_padded.dcm' not in taken


def _with_pixel_data(tmp_path, raw: bytes, undefined: bool = False, **changes):
  """A generated 12 x 10 16-bit slice whose PixelData value is ``raw``."""
  ds = pydicom.dcmread(_generated(tmp_path, **changes))
  ds.PixelData = raw
  ds['PixelData'].VR = 'OW' if not undefined else 'OB'
  if undefined:
    ds['PixelData'].is_undefined_length = True
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def _items(*fragments: bytes) -> bytes:
  """Encapsulated Pixel Data: an empty offset table, one item per fragment."""
  out = b'\xfe\xff\x00\xe0' + struct.pack('<I', 0)
  for fragment in fragments:
    out += b'\xfe\xff\x00\xe0' + struct.pack('<I', len(fragment)) + fragment
  return out


IMAGE = 12 * 10 * 2  # bytes of the generated slice's image


@pytest.mark.parametrize(
  'raw, undefined, expected',
  [
    (b'\x01\x00' * (IMAGE // 2 + 2), False, '4 more than the header describes'),
    (b'\x01\x00' * (IMAGE // 2 + 1), False, '2 more than the header describes'),
    (b'\x01\x00' * (IMAGE // 2 - 1), False, f'pixel data holds {IMAGE - 2} bytes'),
    (b'', False, 'pixel data holds 0 bytes'),
    (_items(b'\x01\x00' * (IMAGE // 2 - 8)), False, 'encapsulated (fragmented)'),
    (
      _items(b'\x01\x00' * 50, b'\x02\x00' * 50) + b'\xfe\xff\xdd\xe0\x00\x00\x00\x00',
      False,
      'encapsulated (fragmented)',
    ),
    (_items(b'\x01\x00' * (IMAGE // 2)), True, 'encapsulated (fragmented)'),
  ],
  ids=['4-extra', '2-extra', '2-short', 'empty', 'items', 'items-and-end', 'undefined'],
)
def test_pixel_data_that_disagrees_with_the_header_is_refused_with_numbers(
  tmp_path, raw, undefined, expected
):
  """Both readers: the native one declines, decode_dicom raises a DicomError
  that gives the numbers; no image other than the header's is returned."""
  data = _with_pixel_data(tmp_path, raw, undefined)
  assert _native.decode(data, DEFAULT_MAX_PIXELS) is None
  with pytest.raises(DicomError, match=re.escape(expected)) as raised:
    decode_dicom(data)
  if 'encapsulated' not in expected:
    assert f'12 x 10 x 1 sample(s) x 1 frame(s) x 16 bits = {IMAGE} bytes' in str(
      raised.value
    )


def test_exact_pixel_data_and_one_padding_byte_are_read(tmp_path):
  exact = _with_pixel_data(
    tmp_path, bytes(range(256)) * (IMAGE // 256) + bytes(IMAGE % 256)
  )
  assert agree(exact)
  # An 8-bit image of odd size: one padding byte makes the value even.
  odd = _with_pixel_data(
    tmp_path,
    bytes(range(1, 16)) + b'\x00',
    Rows=3,
    Columns=5,
    BitsAllocated=8,
    BitsStored=8,
    HighBit=7,
  )
  meta, image, *_ = decode_dicom(odd)
  assert image.tolist() == [list(range(1, 6)), list(range(6, 11)), list(range(11, 16))]


def test_pixels_that_start_like_an_item_tag_are_still_pixels(tmp_path):
  """Real pixels beginning with the bytes of (FFFE,E000) do not chain into
  items to the exact end: they are read as pixels."""
  raw = b'\xfe\xff\x00\xe0' + b'\x07\x00' * (IMAGE // 2 - 2)
  data = _with_pixel_data(tmp_path, raw)
  assert agree(data)


def test_declines_or_matches_on_fuzzed_bytes(tmp_path_factory):
  """Mutants of files it reads (and of compressed ones, which it must decline)."""
  rng = np.random.default_rng(7)
  seeds = fuzz_seeds(tmp_path_factory.mktemp('fuzz')) + [
    open(get_testdata_file(name), 'rb').read()
    for name in ('MR_small_implicit.dcm', 'CT_small.dcm', 'MR_small_padded.dcm')
  ]
  taken = sum(declines_or_agrees(mutate(rng, seeds)) for _ in range(1500))
  # The fuzzed files it read still matched pydicom. (Mutants whose pixel data
  # no longer fits their header are refused by both readers.)
  assert taken >= 75


@pytest.mark.parametrize('implicit', [False, True], ids=['explicit', 'implicit'])
def test_skips_nested_sequences_of_undefined_length(tmp_path, implicit):
  path = _generated(tmp_path)
  ds = pydicom.dcmread(path)
  inner = Dataset()
  inner.ReferencedSOPInstanceUID = '1.2.3'
  inner.Rows = 99  # a tag we read, inside a sequence: must not be taken
  item = Dataset()
  item.ReferencedSOPClassUID = '1.2.840.10008.5.1.4.1.1.4'
  item.ReferencedImageSequence = Sequence([inner])
  item.ReferencedImageSequence.is_undefined_length = True
  ds.ReferencedImageSequence = Sequence([item, Dataset()])
  ds['ReferencedImageSequence'].is_undefined_length = True
  item['ReferencedImageSequence'].is_undefined_length = True
  for element in (item, inner):
    element.is_undefined_length_sequence_item = True
  ds.add_new(0x00291010, 'OB', b'\x01\x02\x03\x04')  # a private tag
  if implicit:
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
  pydicom.dcmwrite(path, ds, enforce_file_format=True)
  data = open(path, 'rb').read()
  assert b'\xfe\xff\xdd\xe0' in data  # a sequence delimiter was written
  assert agree(data)
  assert _native.decode(data, DEFAULT_MAX_PIXELS)[0]['rows'] == 12


@pytest.mark.parametrize(
  'changes',
  [
    {'InstanceNumber': ' 007 '},
    {'InstanceNumber': '+5'},
    {'SliceThickness': '1e1'},
    {'SliceThickness': ' -.5 '},
    {'RescaleSlope': ''},
    {'PixelSpacing': ['0.5', '0.25']},
    {'SOPInstanceUID': '1.2.00003'},
    {'BitsStored': 12, 'HighBit': 11},
  ],
  ids=str,
)
def test_takes_valid_values_in_their_other_forms(tmp_path, changes):
  assert agree(open(_generated(tmp_path, **changes), 'rb').read())


@pytest.mark.parametrize(
  'changes',
  [
    {'InstanceNumber': '1.0'},
    {'InstanceNumber': '12345678901'},
    {'SliceThickness': 'nan'},
    {'SliceThickness': '1_0'},
    {'SliceThickness': ['1', '2']},
    {'PixelSpacing': '0.5'},
    {'PixelSpacing': ['0.5', '0.5', '0.5']},
    {'Modality': ['MR', 'CT']},
    {'NumberOfFrames': '2'},
    {'SamplesPerPixel': 3},
    {'BitsAllocated': 12},
  ],
  ids=str,
)
def test_leaves_unusual_values_to_pydicom(tmp_path, changes):
  data = open(_generated(tmp_path, **changes), 'rb').read()
  assert _native.decode(data, DEFAULT_MAX_PIXELS) is None


def test_leaves_other_syntaxes_and_oversized_images_to_pydicom(tmp_path):
  data = open(_generated(tmp_path), 'rb').read()
  assert agree(data, max_pixels=120)
  assert _native.decode(data, max_pixels=119) is None
  for name in ('MR_small_bigendian.dcm', 'MR_small_RLE.dcm', 'JPEG2000.dcm'):
    data = open(get_testdata_file(name), 'rb').read()
    assert _native.decode(data, DEFAULT_MAX_PIXELS) is None, name
  assert _native.decode(data[:128] + b'DICX' + data[132:], DEFAULT_MAX_PIXELS) is None


def test_declines_an_implicit_syntax_over_explicit_data(tmp_path):
  """pydicom reads such a file as explicit; the native reader stays out."""
  path = _generated(tmp_path)
  data = open(path, 'rb').read()
  explicit = pydicom.uid.ExplicitVRLittleEndian.encode()
  implicit = pydicom.uid.ImplicitVRLittleEndian.encode()
  lied = data.replace(explicit + b'\x00', implicit + b'\x00' * 3, 1)
  assert lied != data and len(lied) == len(data)
  assert _native.decode(lied, DEFAULT_MAX_PIXELS) is None
  decode_dicom(lied)  # and pydicom does read it
