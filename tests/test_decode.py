"""DICOM decoding: generated files, pydicom's bundled files, broken input."""

import glob
import os
import struct
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from beam_pipeline.tools import sample
from transforms.contract.errors import DicomError
from transforms.decode import _native
from transforms.decode.dicom import decode_dicom, native_pixels


def _read(name):
  with open(get_testdata_file(name), 'rb') as f:
    return f.read()


def _decode(name, **kwargs):
  return decode_dicom(_read(name), **kwargs)


def _generated(tmp_path, leading_zero_uids=False, shape=(20, 30)):
  path = tmp_path / 'x.dcm'
  pixels = sample.expected_image('P1', 4, *shape)
  sample.write_dicom(str(path), pixels, 'P1', 4, leading_zero_uids=leading_zero_uids)
  return path.read_bytes(), pixels


def test_generated_slice_round_trips_with_metadata(tmp_path):
  data, pixels = _generated(tmp_path)
  meta, image, *_ = decode_dicom(data)
  np.testing.assert_array_equal(image, pixels)
  assert image.dtype == np.dtype('<i2') and image.flags.c_contiguous
  assert meta['rows'] == 20 and meta['columns'] == 30
  assert meta['pixel_dtype'] == 'int16' and meta['modality'] == 'MR'
  assert meta['instance_number'] == 4
  assert meta['pixel_spacing'] == [1.40625, 1.40625]
  assert meta['image_position_patient'] == [-180.0, -160.5, -38.0]
  assert meta['rescale_slope'] is None and meta['rescale_intercept'] is None
  assert meta['transfer_syntax_uid'] == pydicom.uid.ExplicitVRLittleEndian


def test_leading_zero_uids_are_kept_and_do_not_warn(tmp_path):
  data, _ = _generated(tmp_path, leading_zero_uids=True)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    meta = decode_dicom(data).meta
  assert '.0' in meta['sop_instance_uid']
  components = meta['sop_instance_uid'].split('.')
  assert any(len(c) > 1 and c.startswith('0') for c in components)


@pytest.mark.parametrize(
  'name',
  [
    'MR_small_RLE.dcm',  # RLE Lossless
    'MR_small_jp2klossless.dcm',  # JPEG 2000 lossless
    'MR_small_jpeg_ls_lossless.dcm',  # JPEG-LS lossless
    'MR_small_bigendian.dcm',  # Explicit VR Big Endian
    'MR_small_implicit.dcm',  # Implicit VR Little Endian
  ],
)
def test_lossless_syntaxes_equal_the_uncompressed_file(name):
  reference = _decode('MR_small.dcm').image
  meta, image, *_ = _decode(name)
  np.testing.assert_array_equal(image, reference)
  assert image.dtype.byteorder in '<=|' and meta['pixel_dtype'] == 'int16'
  assert image.tobytes() == reference.astype('<i2').tobytes()


def test_jpeg_lossless_equals_rle_of_the_same_image():
  rle = _decode('SC_rgb_rle.dcm').image
  meta, image, *_ = _decode('SC_rgb_jpeg_gdcm.dcm')  # JPEG Lossless, Process 14
  assert meta['samples_per_pixel'] == 3
  np.testing.assert_array_equal(image, rle)


@pytest.mark.parametrize(
  'name, tolerance',
  [
    ('SC_rgb_jpeg_dcmtk.dcm', 8.0),  # JPEG Baseline
    ('SC_rgb_gdcm_KY.dcm', 8.0),  # JPEG 2000 (lossy)
    ('SC_rgb_jls_lossy_line.dcm', 8.0),  # JPEG-LS near-lossless
  ],
)
def test_lossy_syntaxes_are_close_to_the_lossless_image(name, tolerance):
  rle = _decode('SC_rgb_rle.dcm').image
  meta, image, *_ = _decode(name)
  assert image.shape == rle.shape == (100, 100, 3)
  assert meta['rows'] == 100 and meta['samples_per_pixel'] == 3
  assert np.abs(image.astype(int) - rle.astype(int)).mean() < tolerance


def test_non_mr_modality_is_accepted():
  meta, image, *_ = _decode('693_J2KI.dcm')
  assert meta['modality'] == 'CT' and image.shape == (512, 512)


@pytest.mark.parametrize(
  'data, reason',
  [
    (b'', 'not a DICOM file'),
    (b'this is a text file\n', 'not a DICOM file'),
    (b'\0' * 128 + b'DICM' + b'\x02\x00', 'no Rows, Columns, PixelData'),
  ],
)
def test_garbage_is_rejected(data, reason):
  with pytest.raises(DicomError, match=reason):
    decode_dicom(data)


def test_file_without_preamble_is_rejected():
  with pytest.raises(DicomError, match='DICM'):
    _decode('no_meta.dcm')


def test_truncated_pixel_data_is_rejected_with_the_numbers():
  with pytest.raises(
    DicomError,
    match='pixel data holds 8130 bytes; the header describes 64 x 64 x 1 sample',
  ):
    _decode('MR_truncated.dcm')


def test_pixel_data_longer_than_the_header_says_is_rejected_not_cut():
  """pydicom's own padded test file: 128 bytes beyond the image, which
  pixel_array silently drops (with a warning)."""
  with pytest.raises(DicomError, match='128 more than the header describes'):
    _decode('MR_small_padded.dcm')


def test_truncated_header_is_rejected(tmp_path):
  data, _ = _generated(tmp_path)
  with pytest.raises(DicomError):
    decode_dicom(data[:300])


def test_multi_frame_is_rejected():
  with pytest.raises(DicomError, match='multi-frame'):
    _decode('SC_rgb_rle_2frame.dcm')


def test_missing_pixel_data_is_rejected():
  with pytest.raises(DicomError, match='PixelData'):
    _decode('rtplan.dcm')


def test_images_over_max_pixels_are_rejected_from_the_header(tmp_path):
  data, _ = _generated(tmp_path, shape=(20, 30))
  decode_dicom(data, max_pixels=600)
  with pytest.raises(DicomError, match='max-pixels'):
    decode_dicom(data, max_pixels=599)


def _pydicom_test_files():
  folder = os.path.dirname(get_testdata_file('MR_small.dcm'))
  return sorted(glob.glob(os.path.join(folder, '*.dcm')))


def test_native_fast_path_equals_pixel_array_on_every_pydicom_file():
  compared = []
  for path in _pydicom_test_files():
    try:
      ds = pydicom.dcmread(path)
      reference = ds.pixel_array
    except Exception:
      continue  # not an image pydicom can decode: nothing to compare
    if int(ds.get('NumberOfFrames') or 1) != 1:
      continue
    samples = ds.get('SamplesPerPixel') or 1
    fast = native_pixels(ds, ds.Rows, ds.Columns, samples)
    if fast is None:
      continue
    np.testing.assert_array_equal(fast, reference, err_msg=path)
    assert fast.dtype == reference.dtype.newbyteorder('<'), path
    compared.append(os.path.basename(path))
  # Little and big endian, implicit and explicit VR, 8 and 16 bits, signed and not.
  # (MR_small_padded.dcm is no longer read: its data is longer than its header.)
  assert len(compared) >= 9, compared
  assert {'MR_small.dcm', 'MR_small_bigendian.dcm', 'CT_small.dcm'} <= set(compared)


@pytest.mark.parametrize(
  'allocated, stored, signed',
  [
    (16, 12, 0),
    (16, 12, 1),
    (16, 16, 0),
    (16, 16, 1),
    (8, 8, 0),
    (8, 7, 1),
    (32, 32, 1),
    (32, 20, 0),
  ],
)
@pytest.mark.parametrize(
  'syntax', [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian]
)
def test_native_fast_path_masks_and_sign_extends_like_pydicom(
  tmp_path, allocated, stored, signed, syntax
):
  rng = np.random.default_rng(allocated * 100 + stored + signed)
  dtype = np.dtype(f'{"i" if signed else "u"}{allocated // 8}')
  info = np.iinfo(dtype)
  raw = rng.integers(info.min, info.max, size=(6, 7), dtype=dtype, endpoint=True)
  path = str(tmp_path / 'x.dcm')
  sample.write_dicom(path, np.zeros((6, 7), np.int16), 'P', 1)
  ds = pydicom.dcmread(path)
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
  ds.PixelRepresentation = signed
  ds.file_meta.TransferSyntaxUID = syntax
  order = '>' if syntax == pydicom.uid.ExplicitVRBigEndian else '<'
  ds.PixelData = raw.astype(dtype.newbyteorder(order)).tobytes()
  pydicom.dcmwrite(
    path, ds, implicit_vr=False, little_endian=order == '<', enforce_file_format=True
  )
  ds = pydicom.dcmread(path)
  fast = native_pixels(ds, 6, 7, 1)
  if order == '>' and allocated == 8:
    assert fast is None  # left to pydicom: its OW words are swapped in pairs
  else:
    np.testing.assert_array_equal(fast, ds.pixel_array)
  meta, image, *_ = decode_dicom(open(path, 'rb').read())
  np.testing.assert_array_equal(image, ds.pixel_array)


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
  """One explicit VR little-endian element (short-length VRs only)."""
  return (
    struct.pack('<HH', tag >> 16, tag & 0xFFFF)
    + vr
    + struct.pack('<H', len(value))
    + value
  )


# What may follow Pixel Data: each would change or break the outcome if parsed.
_TRAILERS = {
  # a second Rows: parsed, it would replace the header's and fail the shape
  'rows again': _explicit(0x00280010, b'US', struct.pack('<H', 7)),
  # 2 MiB of tiny private elements: about 0.5 s of pydicom parsing
  'many tiny elements': _explicit(0x00091010, b'LO', b'') * (256 * 1024),
  'random bytes': bytes(np.random.default_rng(5).integers(0, 256, 1 << 20, np.uint8)),
  'an element claiming 4 GiB': struct.pack(
    '<HH2sHI', 0x0009, 0x1011, b'OB', 0, 2**32 - 2
  ),
  'trailing padding': struct.pack('<HH2sHI', 0xFFFC, 0xFFFC, b'OB', 0, 64) + bytes(64),
}


@pytest.mark.parametrize('trailer', _TRAILERS, ids=list(_TRAILERS))
@pytest.mark.parametrize('source', ['generated', 'MR_small_RLE.dcm'])
def test_nothing_after_pixel_data_is_parsed(tmp_path, source, trailer):
  """Bytes after the top-level Pixel Data never change the outcome, for the
  native reader (generated slices) and for pydicom (RLE): the slice decodes
  exactly as without them."""
  clean = _generated(tmp_path)[0] if source == 'generated' else _read(source)
  data = clean + _TRAILERS[trailer]
  expected = decode_dicom(clean)
  got = decode_dicom(data)
  np.testing.assert_array_equal(got.image, expected.image)
  assert got.meta == expected.meta
  if source == 'generated':
    native = _native.decode(data, 1 << 24)
    assert native is not None
    np.testing.assert_array_equal(native.image, expected.image)
    assert native.meta == expected.meta
