"""Memory bounds (issue 12, point 4): files refused before they are read or
inflated, a decoder child under an address-space limit, row groups cut by
decoded bytes, files read a window at a time, pixels not copied needlessly.
The peak RSS figures are in BENCHMARKS.md (bench/memory.py)."""

from __future__ import annotations

import io
import math
import os
import pickle
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from beam_pipeline.dataset import open_dataset, read_errors, row_groups
from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from tests import crashers
from transforms.contract import packing, schema
from transforms.contract.errors import DicomError
from transforms.decode import _isolate, _native, assemble
from transforms.decode.dicom import decode_dicom
from transforms.decode.stage import SliceDecoder
from transforms.outcomes import Decoded, Failed
from transforms.settings import DecodeSettings, Limits

ROWS = COLUMNS = 16


def _slice_bytes(pid='P', k=1, rows=ROWS, columns=COLUMNS) -> bytes:
  buffer = io.BytesIO()
  ds = _dataset(pid, k, rows, columns)
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def _dataset(pid, k, rows, columns) -> pydicom.Dataset:
  path = io.BytesIO()
  sample.write_dicom(path, sample.expected_image(pid, k, rows, columns), pid, k)
  path.seek(0)
  return pydicom.dcmread(path)


def _deflate_bomb(inflated: int) -> bytes:
  """A Deflated Explicit VR slice whose data set inflates past ``inflated``
  bytes (a private OB of zeros before the pixels), a few KB on disk."""
  ds = _dataset('P', 1, ROWS, COLUMNS)
  ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
  ds.private_block(0x0009, 'BOMB', create=True).add_new(0x00, 'OB', bytes(inflated))
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  return buffer.getvalue()


def test_a_deflate_bomb_is_refused_before_it_is_inflated():
  bomb = _deflate_bomb(8 << 20)
  assert len(bomb) < 64 << 10
  with pytest.raises(DicomError, match='inflates to more than 1048576 bytes'):
    decode_dicom(bomb, max_file_bytes=1 << 20)
  # Within the limit it is a slice like any other.
  np.testing.assert_array_equal(
    decode_dicom(bomb, max_file_bytes=16 << 20).image,
    sample.expected_image('P', 1, ROWS, COLUMNS),
  )


def test_a_corrupt_deflate_stream_is_a_decode_error():
  bomb = bytearray(_deflate_bomb(1 << 20))
  bomb[-200:] = b'\xff' * 200
  with pytest.raises(DicomError):
    decode_dicom(bytes(bomb))


def _tree_with(tmp_path, big_dicom: bytes, big_contour: bytes):
  root = str(tmp_path / 'DATA')
  manifest = sample.make_tree(
    root, patients=2, slices=3, rows=ROWS, columns=COLUMNS, contour_every=1
  )
  pid, original_id = manifest.links[0]
  with open(os.path.join(root, 'dicoms', pid, '2.dcm'), 'wb') as f:
    f.write(big_dicom)
  contour_dir = os.path.join(root, 'contourfiles', original_id)
  contour = sorted(
    os.path.join(d, n) for d, _, ns in os.walk(contour_dir) for n in ns if '0003' in n
  )[0]
  with open(contour, 'ab') as f:
    f.write(big_contour)
  return root, manifest, pid, os.path.relpath(contour, root)


def test_files_above_max_file_bytes_are_refused_unread(tmp_path):
  """A slice and a contour file larger than --max-file-bytes are each one
  read row giving both sizes; a deflated slice that would inflate past it is
  one decode row; everything else lands."""
  limit = 256 << 10
  padded = _slice_bytes('P', 2) + b'\0' * (limit + 10)  # junk after the pixels
  root, manifest, pid, contour = _tree_with(tmp_path, padded, b'\n' * (limit + 1))
  bomb_path = os.path.join(root, 'dicoms', pid, '1.dcm')
  with open(bomb_path, 'wb') as f:
    f.write(_deflate_bomb(4 * limit))
  out = str(tmp_path / 'OUT')
  code = cli.main(['--input', root, '--output', out, '--max-file-bytes', str(limit)])
  assert code == cli.EXIT_DROPPED
  errors = {(r['path'], r['stage']): r['error'] for r in read_errors(out).to_pylist()}
  size = os.path.getsize(os.path.join(root, 'dicoms', pid, '2.dcm'))
  assert errors[(f'dicoms/{pid}/2.dcm', schema.STAGE_READ)].startswith(
    f'file of {size} bytes is larger than --max-file-bytes {limit}'
  )
  assert 'larger than --max-file-bytes' in errors[(contour, schema.STAGE_READ)]
  assert 'inflates to more than' in errors[(f'dicoms/{pid}/1.dcm', schema.STAGE_DECODE)]
  assert len(errors) == 3
  rows = open_dataset(out).to_table(columns=['patient_id', 'slice_index']).to_pylist()
  assert len(rows) == 6 - 2
  # Without the limit the padded slice is an ordinary slice.
  out2 = str(tmp_path / 'OUT2')
  assert cli.main(['--input', root, '--output', out2]) == cli.EXIT_OK
  assert open_dataset(out2).count_rows() == 6


def test_the_decoder_child_runs_under_an_address_space_limit(tmp_path):
  """An allocation of 1 GiB in the child fails as MemoryError (one Failed),
  and the next file decodes in a fresh start of the same child."""
  root = tmp_path / 'DATA'
  root.mkdir()
  (root / 'balloon.dcm').write_bytes(crashers.BALLOON + b' 1 GiB please')
  (root / 'good.dcm').write_bytes(_slice_bytes())
  decoder = _isolate.IsolatedDecoder(
    str(root), crashers.misbehaving_decode, timeout=30, memory=256 << 20
  )
  try:
    balloon, good = decoder.decode_all(['balloon.dcm', 'good.dcm'], Limits())
  finally:
    decoder.close()
  assert isinstance(balloon, Failed) and 'MemoryError' in balloon.message
  assert isinstance(good, Decoded)


def test_the_default_headroom_admits_the_largest_slice_the_limits_allow():
  limits = Limits()
  largest_image = 8 * limits.max_pixels  # 64-bit samples
  assert _isolate.decoder_headroom(limits) >= 2 * limits.max_file_bytes + largest_image


def _row_group_sizes(out):
  return [pq.read_metadata(path).row_group(i).num_rows for path, i in row_groups(out)]


@pytest.mark.parametrize('labeled', [False, True])
def test_row_groups_are_cut_by_decoded_bytes(tmp_path, labeled):
  """With --max-chunk-bytes of three images, each 8-slice chunk becomes row
  groups of 3, 3 and 2 rows; labeled slices, gathered from several chunks
  into row groups of their own, keep to the same budget; nothing is lost or
  repeated."""
  root = str(tmp_path / 'DATA')
  every = 2 if labeled else 9  # slices 2, 4, 6, 8 labeled, or none
  sample.make_tree(
    root, patients=2, slices=8, rows=ROWS, columns=COLUMNS, contour_every=every
  )
  out = str(tmp_path / 'OUT')
  image = ROWS * COLUMNS * 2
  args = ['--input', root, '--output', out, '--chunk-size', '8']
  code = cli.main([*args, '--max-chunk-bytes', str(3 * image)])
  assert code == cli.EXIT_OK  # without contours too: missing_contours drops nothing
  groups = _row_group_sizes(out)
  if labeled:
    assert max(groups) == 3 and sum(groups) == 16
  else:
    assert sorted(groups) == [2, 2, 3, 3, 3, 3]
  keys = open_dataset(out).to_table(columns=['patient_id', 'slice_index']).to_pylist()
  assert len({(r['patient_id'], r['slice_index']) for r in keys}) == 16 == len(keys)


@pytest.mark.parametrize('flag', ['--max-chunk-bytes', '--max-file-bytes'])
@pytest.mark.parametrize('value', ['0', str(2**31)])
def test_budget_options_are_checked_up_front(tmp_path, capsys, flag, value):
  if flag == '--max-file-bytes' and value != '0':
    return  # any positive file limit is valid
  code = cli.main(
    ['--input', str(tmp_path), '--output', str(tmp_path / 'O'), flag, value]
  )
  assert code == cli.EXIT_USAGE
  assert flag in capsys.readouterr().err


def test_files_for_pydicom_are_read_a_window_at_a_time(tmp_path, monkeypatch):
  """The bytes of files the native reader declines are held for one window
  (a quarter of --max-chunk-bytes), not for the whole chunk."""
  data = open(get_testdata_file('MR_small_RLE.dcm'), 'rb').read()
  paths = []
  for k in range(12):
    (tmp_path / f'{k}.dcm').write_bytes(data)
    paths.append(f'{k}.dcm')
  settings = DecodeSettings(isolate=False, max_chunk_bytes=4 * 3 * len(data))
  decoder = SliceDecoder(str(tmp_path), settings, decode_dicom)
  held = []
  inner = decoder._fallback.decode_all

  def recording(paths, limits, datas):
    held.append(sum(len(d) for d in datas))
    return inner(paths, limits, datas)

  monkeypatch.setattr(decoder._fallback, 'decode_all', recording)
  outcomes = [outcome for outcome, _ in decoder.outcomes(paths)]
  assert all(isinstance(o, Decoded) for o in outcomes) and len(outcomes) == 12
  assert len(held) == 4 and max(held) == 3 * len(data)


def test_the_native_reader_returns_a_view_of_the_file():
  """No pixel copy where a view will do: a little-endian slice using all its
  bits is a view of the file's bytes until it goes into the Arrow table."""
  ds = _dataset('P', 1, ROWS, COLUMNS)
  ds.BitsStored = 16
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  data = buffer.getvalue()
  decoded = _native.decode(data, 1 << 20)
  assert np.shares_memory(decoded.image, np.frombuffer(data, np.uint8))


def test_the_slice_table_equals_the_row_by_row_table():
  rng = np.random.default_rng(3)
  images = [rng.integers(-500, 500, (4, 5 + k), np.int16) for k in range(3)]
  rows = []
  for k, image in enumerate(images):
    row = dict.fromkeys(schema.SLICE_SCHEMA.names)
    row.update(patient_id='P', original_id='O', slice_index=k, split='train')
    row.update(dicom_path=f'd/{k}.dcm', qa_flags=[], image=image)
    rows.append(row)
  expected = pa.Table.from_pylist(
    [{**r, 'image': r['image'].tobytes()} for r in rows], schema=schema.SLICE_SCHEMA
  )
  table = assemble.slice_table(rows)
  assert table.schema.equals(schema.SLICE_SCHEMA, check_metadata=True)
  assert table.equals(expected)
  assert math.prod(images[0].shape) * 2 == len(table['image'][0].as_py())


def test_reads_ahead_stay_in_order_and_within_the_byte_budget():
  """The object-store prefetcher: results in order across batches queued
  one ahead, never more sent-and-unconsumed requests than the concurrency,
  and one at a time once files are as large as the budget."""
  import threading

  from transforms.io.prefetch import Prefetcher

  sizes = {f'small{k}': 1000 for k in range(40)}
  sizes |= {f'big{k}': 4000 for k in range(6)}
  out, peak, lock = [0], [0], threading.Lock()

  def read(path):
    with lock:
      out[0] += 1
      peak[0] = max(peak[0], out[0])
    return bytes(sizes[path])

  prefetcher = Prefetcher(concurrency=8, budget=4000)
  first = prefetcher.fetch([f'small{k}' for k in range(40)], read)
  second = prefetcher.fetch([f'big{k}' for k in range(6)], read)  # queued ahead
  got = []
  for data in first:
    got.append(len(data))
    with lock:
      out[0] -= 1
  # 4,000 bytes hold four files; the next is sent as each is handed over,
  # before this loop counts it consumed: hence one more
  assert got == [1000] * 40 and peak[0] <= 4 + 1
  peak[0] = out[0]
  for data in second:
    assert len(data) == 4000
    with lock:
      out[0] -= 1
  # sent before the first large file arrived: at most four, then one at a time
  assert peak[0] <= 4 + 1
  assert prefetcher._depth() == 1
  prefetcher.close()


def test_no_shuffle_holds_an_element_per_file(tmp_path, monkeypatch):
  """What waits in the runner's shuffles (the joins, the Reshuffle, the
  duplicate search) is packed per folder, chunk or bucket, not an element
  per file (issue 16, target 4): far fewer elements than slices."""
  from apache_beam.coders.coder_impl import create_InputStream
  from apache_beam.runners.portability.fn_api_runner import execution

  held = []
  append = execution.GroupingBuffer.append

  def counting(self, elements_data):
    append(self, elements_data)
    stream = create_InputStream(elements_data)
    coder = self._pre_grouped_coder.get_impl()
    while stream.size() > 0:
      held.append(coder.decode_from_stream(stream, True).value)

  monkeypatch.setattr(execution.GroupingBuffer, 'append', counting)
  root = str(tmp_path / 'tree')
  manifest = sample.make_tree(
    root, patients=4, slices=60, rows=ROWS, columns=COLUMNS, contour_every=2
  )
  out = str(tmp_path / 'out')
  code = cli.main(['--input', root, '--output', out, '--direct_running_mode=in_memory'])
  assert code == cli.EXIT_OK
  assert len(manifest.slices) == 240
  assert 0 < len(held) < len(manifest.slices) / 2, len(held)
  # ... and compressed: the packed values (file groups, chunks, identities)
  # take well under their plain pickled size.
  packed = list(_packed_values(held))
  assert len(packed) >= len(held) / 2
  plain = sum(
    len(pickle.dumps(packing.unpack(v), pickle.HIGHEST_PROTOCOL)) for v in packed
  )
  assert sum(map(len, packed)) < 0.6 * plain


def _packed_values(values):
  """The bytes inside ``values`` (nested tuples) that packing.unpack takes."""
  for value in values:
    if isinstance(value, tuple):
      yield from _packed_values(value)
    elif isinstance(value, bytes):
      try:
        packing.unpack(value)
      except (zlib.error, pickle.UnpicklingError):
        continue
      yield value
