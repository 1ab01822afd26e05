"""Hostile and broken inputs: each is built here, run through the whole job, and
must give exactly its row in the reports while every good slice still lands."""

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from beam_pipeline.dataset import open_dataset, read_errors, read_reconciliation
from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from tests.helpers import reference_mask, set_tags
from transforms.contract import layout, schema

P1, O1 = 'SCD0000101', 'SC-HF-I-101'
P2, O2 = 'SCD0000102', 'SC-HF-I-102'
ROWS = COLUMNS = 16


@pytest.fixture(autouse=True)
def no_traceback_on_the_console(capfd):
  """Whatever reaches file descriptor 2 during the test holds no traceback.

  Logging is pointed at the real stderr first: an earlier test's main() may
  have left the root logger writing to a stream pytest has closed since.
  """
  logging.basicConfig(stream=sys.__stderr__, level=logging.INFO, force=True)
  yield
  assert 'Traceback' not in capfd.readouterr().err


@pytest.fixture
def base(tmp_path):
  """A clean tree of two patients with three slices each: (root, manifest)."""
  root = str(tmp_path / 'DATA')
  manifest = sample.make_tree(
    root, patients=2, slices=3, rows=ROWS, columns=COLUMNS, contour_every=1
  )
  return root, manifest


def _run(root, out, *extra):
  code = cli.main(['--input', root, '--output', out, *extra])
  rows = open_dataset(out).to_table(columns=['patient_id', 'slice_index']).to_pylist()
  return (
    code,
    sorted((r['patient_id'], r['slice_index']) for r in rows),
    sorted(
      (r['patient_id'], r['original_id'], r['status'])
      for r in read_reconciliation(out).to_pylist()
      if r['status'] != schema.MATCHED
    ),
    sorted((r['path'], r['stage']) for r in read_errors(out).to_pylist()),
  )


def _write(root, relative, data):
  path = os.path.join(root, *relative.split('/'))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data if isinstance(data, bytes) else data.encode())
  return path


HEADER = 'patient_id,original_id\n'
BOTH = f'{P1},{O1}\n{P2},{O2}\n'
ALL_SLICES = [(p, k) for p in (P1, P2) for k in (1, 2, 3)]
UNLINKED_BOTH = [
  (P1, '', schema.UNLINKED_DICOMS),
  (P2, '', schema.UNLINKED_DICOMS),
  ('', O1, schema.UNLINKED_CONTOURS),
  ('', O2, schema.UNLINKED_CONTOURS),
]


@pytest.mark.parametrize(
  'content, slices, problems',
  [
    pytest.param(
      b'', [], [('', '', schema.MALFORMED_LINK)] + UNLINKED_BOTH, id='empty file'
    ),
    pytest.param(
      HEADER.encode(),
      [],
      [('', '', schema.MALFORMED_LINK)] + UNLINKED_BOTH,
      id='header only',
    ),
    pytest.param(
      ('pid,oid\n' + BOTH).encode(),
      [],
      [('', '', schema.MALFORMED_LINK)] + UNLINKED_BOTH,
      id='wrong header names',
    ),
    pytest.param(
      f'patient_id,original_id,site\n{P1},{O1},A\n{P2},{O2},B\n'.encode(),
      ALL_SLICES,
      [],
      id='extra columns',
    ),
    pytest.param(
      f'\n{HEADER}\n\n{P1},{O1}\n\n{P2},{O2}\n\n'.encode(),
      ALL_SLICES,
      [],
      id='blank lines',
    ),
    pytest.param(
      f'"patient_id","original_id"\n"{P1}","{O1}"\n"{P2}",{O2}\n'.encode(),
      ALL_SLICES,
      [],
      id='quoted fields',
    ),
    pytest.param(
      f'\ufeff{HEADER}{BOTH}'.replace('\n', '\r\n').encode(),
      ALL_SLICES,
      [],
      id='BOM and CRLF',
    ),
    pytest.param(
      HEADER.encode() + f'{P1},{O1}\n'.encode() + b'SCD\xff\xfe02,' + O2.encode(),
      ALL_SLICES[:3],
      [
        ('SCD\ufffd\ufffd02', O2, schema.MALFORMED_LINK),
        (P2, '', schema.UNLINKED_DICOMS),
        ('', O2, schema.UNLINKED_CONTOURS),
      ],
      id='non-UTF-8 bytes',
    ),
    pytest.param(
      f'{HEADER}{P1}\n{P2},{O2}\n'.encode(),
      ALL_SLICES[3:],
      [
        (P1, '', schema.MALFORMED_LINK),
        (P1, '', schema.UNLINKED_DICOMS),
        ('', O1, schema.UNLINKED_CONTOURS),
      ],
      id='row with one field',
    ),
    pytest.param(
      f'{HEADER}{BOTH}{P1},{O1}\n'.encode(),
      ALL_SLICES,
      [(P1, O1, schema.DUPLICATE_LINK)],
      id='duplicate patient id',
    ),
    pytest.param(
      f'{HEADER}{P1},{O1}\n{P2},{O1}\n'.encode(),
      ALL_SLICES[:3],
      [
        (P2, O1, schema.DUPLICATE_LINK),
        (P2, '', schema.UNLINKED_DICOMS),
        ('', O2, schema.UNLINKED_CONTOURS),
      ],
      id='two patients share an original_id',
    ),
  ],
)
def test_link_csv_variants(base, tmp_path, content, slices, problems):
  root, _ = base
  _write(root, layout.LINK_FILE, content)
  code, written, found, errors = _run(root, str(tmp_path / 'OUT'))
  assert written == sorted(slices)
  assert found == sorted(problems)
  assert errors == []
  assert code == (cli.EXIT_DROPPED if problems else cli.EXIT_OK)


class _OpenAudit:
  """Records every path this process opens (Python's audit hook 'open')."""

  paths: list[str] = []
  active = False
  installed = False

  @classmethod
  def hook(cls, event, args):
    if cls.active and event == 'open' and isinstance(args[0], str):
      cls.paths.append(os.path.realpath(args[0]))


@pytest.fixture
def open_audit():
  if not _OpenAudit.installed:
    sys.addaudithook(_OpenAudit.hook)
    _OpenAudit.installed = True
  _OpenAudit.paths = []
  _OpenAudit.active = True
  yield _OpenAudit.paths
  _OpenAudit.active = False


def test_ids_and_symlinks_never_lead_outside_the_input(base, tmp_path, open_audit):
  root, _ = base
  decoy = tmp_path / 'decoy'
  sample.make_tree(str(decoy), patients=1, slices=1, rows=8, columns=8)
  decoy_file = decoy / 'dicoms' / P1 / '1.dcm'
  bad_ids = ['../decoy', '/etc', 'a/b', 'nul\0x', 'new\nline']
  rows = ''.join('"{}",{}\n'.format(b, f'O-{n}') for n, b in enumerate(bad_ids))
  _write(root, layout.LINK_FILE, HEADER + BOTH + rows)
  os.symlink(decoy_file, os.path.join(root, 'dicoms', P1, '4.dcm'))
  os.symlink(decoy / 'dicoms' / P1, os.path.join(root, 'dicoms', 'SCD0000999'))
  open_audit.clear()  # from here on, only the job's own opens
  code, written, found, errors = _run(root, str(tmp_path / 'OUT'))
  assert written == ALL_SLICES
  assert found == sorted(
    (b, f'O-{n}', schema.MALFORMED_LINK) for n, b in enumerate(bad_ids)
  )
  assert errors == sorted(
    [
      ('dicoms/SCD0000999', schema.STAGE_LIST),
      (f'dicoms/{P1}/4.dcm', schema.STAGE_READ),
    ]
  )
  assert code == cli.EXIT_DROPPED
  allowed = (os.path.realpath(root), os.path.realpath(tmp_path / 'OUT'))
  decoy_opens = [p for p in open_audit if p.startswith(os.path.realpath(decoy))]
  assert decoy_opens == []
  assert not [p for p in open_audit if p.startswith('/etc/') and 'dicoms' in p]
  assert any(p.startswith(allowed[0]) for p in open_audit)  # the hook does see reads


def _dicom_bytes(tmp_path, **tags):
  path = str(tmp_path / 'source.dcm')
  sample.write_dicom(path, sample.expected_image('X', 1, ROWS, COLUMNS), 'X', 1)
  import pydicom

  set_tags(pydicom.dcmread(path), **tags).save_as(path)
  with open(path, 'rb') as f:
    return f.read()


def test_broken_dicoms_are_each_one_error_row(base, tmp_path):
  root, manifest = base
  good = open(os.path.join(root, 'dicoms', P1, '1.dcm'), 'rb').read()
  broken = {
    4: b'',  # zero bytes
    5: good[:200],  # truncated header
    6: good[: len(good) - 100],  # truncated pixel data
    7: b'patient notes\nnot an image\n',  # a text file named .dcm
    8: open(get_testdata_file('no_meta.dcm'), 'rb').read(),  # no preamble
    9: _dicom_bytes(tmp_path, PixelData=None),  # no PixelData
    10: _dicom_bytes(tmp_path, Rows=None),  # no Rows
    11: _dicom_bytes(tmp_path, Rows=65535, Columns=65535),  # claims 8 GiB
    12: open(get_testdata_file('SC_rgb_rle_2frame.dcm'), 'rb').read(),  # multi-frame
  }
  for k, data in broken.items():
    _write(root, f'dicoms/{P1}/{k}.dcm', data)
  _write(
    root, f'dicoms/{P1}/13.dcm', open(get_testdata_file('CT_small.dcm'), 'rb').read()
  )
  code, written, found, errors = _run(root, str(tmp_path / 'OUT'))
  assert written == sorted(ALL_SLICES + [(P1, 13)])  # a CT slice is accepted
  assert errors == sorted((f'dicoms/{P1}/{k}.dcm', schema.STAGE_DECODE) for k in broken)
  messages = {
    r['path']: r['error'] for r in read_errors(str(tmp_path / 'OUT')).to_pylist()
  }
  assert 'max-pixels' in messages[f'dicoms/{P1}/11.dcm']
  assert 'multi-frame' in messages[f'dicoms/{P1}/12.dcm']
  assert 'DICM' in messages[f'dicoms/{P1}/8.dcm']
  assert found == [] and code == cli.EXIT_DROPPED


def test_a_huge_header_is_rejected_before_any_allocation(tmp_path):
  import tracemalloc

  from transforms.decode.dicom import decode_dicom

  data = _dicom_bytes(tmp_path, Rows=65535, Columns=65535)
  tracemalloc.start()
  with pytest.raises(Exception, match='max-pixels'):
    decode_dicom(data)
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  assert peak < 50 * 2**20  # the image would need 8 GiB


def _contour(vertices, newline='\n'):
  return ''.join(f'{x} {y}{newline}' for x, y in vertices)


def test_broken_contours_are_each_one_error_row_and_odd_good_ones_land(base, tmp_path):
  root, manifest = base
  i_dir, o_dir = f'contourfiles/{O1}/i-contours', f'contourfiles/{O1}/o-contours'
  angles = np.linspace(0, 2 * np.pi, 1_000_000, endpoint=False)
  million = list(zip(8 + 5 * np.cos(angles), 8 + 5 * np.sin(angles), strict=True))
  outside = [(-20.0, -20.0), (40.0, -5.0), (8.0, 40.0)]
  triangle = [(2.0, 2.0), (13.0, 3.0), (7.0, 12.0)]
  bad = {
    f'{i_dir}/{layout.contour_name("i", 1)}': '',
    f'{o_dir}/{layout.contour_name("o", 1)}': '5 5\n',
    f'{i_dir}/{layout.contour_name("i", 2)}': '5 5\n6 6\n',
    f'{o_dir}/{layout.contour_name("o", 2)}': '5 5\n6 six\n7 7\n',
    f'{i_dir}/{layout.contour_name("i", 3)}': '5 5\nnan 6\n7 7\n',
    f'{o_dir}/{layout.contour_name("o", 3)}': '5 5\n6 inf\n7 7\n',
  }
  for relative, text in bad.items():
    _write(root, relative, text)
  good = {
    (P2, 1, 'i'): outside,  # clipped like the reference
    (P2, 2, 'o'): million,  # a million vertices
    (P2, 3, 'i'): triangle,  # Windows line endings
  }
  _write(
    root,
    f'contourfiles/{O2}/i-contours/{layout.contour_name("i", 1)}',
    _contour(outside),
  )
  _write(
    root,
    f'contourfiles/{O2}/o-contours/{layout.contour_name("o", 2)}',
    _contour(million),
  )
  _write(
    root,
    f'contourfiles/{O2}/i-contours/{layout.contour_name("i", 3)}',
    _contour(triangle, '\r\n'),
  )
  _write(root, f'{i_dir}/{layout.contour_name("i", 7)}', _contour(triangle))  # no 7.dcm
  _write(root, f'{i_dir}/IM-0001-7-icontour.txt', _contour(triangle))  # bad name
  out = str(tmp_path / 'OUT')
  code, written, found, errors = _run(root, out)
  assert written == ALL_SLICES
  assert errors == sorted(
    [(p, schema.STAGE_CONTOUR) for p in bad]
    + [(f'{i_dir}/IM-0001-7-icontour.txt', schema.STAGE_LIST)]
  )
  assert found == [(P1, O1, schema.CONTOUR_WITHOUT_DICOM)]
  rows = {
    (r['patient_id'], r['slice_index']): r
    for r in open_dataset(out).to_table().to_pylist()
  }
  for k in (1, 2, 3):
    assert rows[P1, k]['i_mask'] is None and rows[P1, k]['o_mask'] is None
  for (pid, k, kind), vertices in good.items():
    mask = np.unpackbits(np.frombuffer(rows[pid, k][f'{kind}_mask'], np.uint8))
    want = reference_mask(vertices, ROWS, COLUMNS)
    assert (mask[: ROWS * COLUMNS].reshape(ROWS, COLUMNS) == want).all()
  assert 'i_vertices_outside' in rows[P2, 1]['qa_flags']
  assert code == cli.EXIT_DROPPED


def test_special_entries_in_the_tree(base, tmp_path):
  root, _ = base
  os.makedirs(os.path.join(root, 'dicoms', P1, '4.dcm'))  # a folder, not a file
  os.mkfifo(os.path.join(root, 'dicoms', P1, '5.dcm'))  # would block a read
  deep = os.path.join(root, 'dicoms', P2, *['d'] * 150)
  os.makedirs(deep)
  with open(os.path.join(deep, '1.dcm'), 'wb') as f:
    f.write(b'deep')
  os.symlink('/nonexistent/target', os.path.join(root, 'dicoms', P1, '6.dcm'))
  code, written, found, errors = _run(root, str(tmp_path / 'OUT'))
  assert written == ALL_SLICES
  assert errors == sorted(
    [
      (f'dicoms/{P1}/4.dcm', schema.STAGE_LIST),
      (f'dicoms/{P1}/5.dcm', schema.STAGE_LIST),
      (f'dicoms/{P1}/6.dcm', schema.STAGE_LIST),
      ('/'.join(['dicoms', P2, *['d'] * 150, '1.dcm']), schema.STAGE_LIST),
    ]
  )
  assert code == cli.EXIT_DROPPED


def test_many_patients_with_one_slice_each(tmp_path):
  root = str(tmp_path / 'DATA')
  manifest = sample.make_tree(
    root, patients=10_000, slices=1, rows=4, columns=4, contour_every=1
  )
  code, written, found, errors = _run(root, str(tmp_path / 'OUT'))
  assert code == cli.EXIT_OK
  assert written == sorted(manifest.slices) and found == [] and errors == []


def test_strict_fails_the_run_after_writing_the_reports(base, tmp_path):
  root, _ = base
  _write(root, f'dicoms/{P1}/4.dcm', b'')
  code, written, found, errors = _run(root, str(tmp_path / 'OUT'), '--strict')
  assert code == cli.EXIT_STRICT
  assert written == ALL_SLICES and errors == [
    (f'dicoms/{P1}/4.dcm', schema.STAGE_DECODE)
  ]


@pytest.mark.parametrize('isolate', [True, False], ids=['isolated', 'in-process'])
def test_a_crash_hang_or_memory_error_costs_only_its_slice(tmp_path, isolate):
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to

  from tests import crashers
  from transforms.decode.chunks import SliceChunk, SliceTask
  from transforms.decode.stage import DecodeSlicesFn
  from transforms.settings import DecodeSettings

  root = tmp_path / 'DATA'
  faults = {2: crashers.MEMORY}
  if isolate:  # in-process, a segfault or a hang would take the test down
    faults.update({3: crashers.SEGFAULT, 5: crashers.HANG})
  chunks = []
  for pid in (P1, P2):
    os.makedirs(root / 'dicoms' / pid)
    tasks = []
    for k in range(1, 7):
      path = root / 'dicoms' / pid / f'{k}.dcm'
      if pid == P1 and k in faults:
        path.write_bytes(faults[k] + b' not a real file')
      else:
        sample.write_dicom(str(path), sample.expected_image(pid, k, 8, 8), pid, k)
      tasks.append(SliceTask(k, f'dicoms/{pid}/{k}.dcm', None, None))
    chunks.append(SliceChunk(pid, pid, 0, 1, tuple(tasks)))
  decode = DecodeSlicesFn(
    str(root),
    DecodeSettings(isolate=isolate, decode_timeout=3),
    decode_fn=crashers.misbehaving_decode,
  )
  with TestPipeline() as p:
    out = (
      p
      | beam.Create(chunks)
      | beam.ParDo(decode).with_outputs(DecodeSlicesFn.ERRORS, main='slices')
    )
    written = out.slices | beam.FlatMap(
      lambda t: zip(
        t.column('patient_id').to_pylist(),
        t.column('slice_index').to_pylist(),
        strict=True,
      )
    )
    assert_that(
      written,
      equal_to(
        [
          (pid, k)
          for pid in (P1, P2)
          for k in range(1, 7)
          if pid == P2 or k not in faults
        ]
      ),
      label='GoodSlicesLand',
    )
    reasons = {
      2: 'MemoryError',
      3: 'crashed (killed by signal SIGSEGV)',
      5: 'timed out',
    }
    assert_that(
      out[DecodeSlicesFn.ERRORS]
      | beam.Map(
        lambda r: (r['path'], r['stage'], reasons[int(r['path'][-5])] in r['error'])
      ),
      equal_to([(f'dicoms/{P1}/{k}.dcm', schema.STAGE_DECODE, True) for k in faults]),
      label='OneErrorEach',
    )


def test_unreadable_files_and_folders(base, tmp_path):
  """Permission denied, for real: as root, the job runs without the
  capabilities that bypass file permissions (setpriv, from util-linux)."""
  import subprocess

  root, _ = base
  os.chmod(os.path.join(root, 'dicoms', P1, '2.dcm'), 0)
  os.chmod(os.path.join(root, 'dicoms', P2), 0)
  prefix = []
  if os.geteuid() == 0:
    setpriv = shutil.which('setpriv')
    assert setpriv, 'setpriv (util-linux) is needed to drop root file access'
    prefix = [setpriv, '--bounding-set', '-dac_override,-dac_read_search', '--']
  out = str(tmp_path / 'OUT')
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'run_pipeline.py')
  done = subprocess.run(
    [*prefix, sys.executable, script, '--input', root, '--output', out],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=str(tmp_path),
  )
  os.chmod(os.path.join(root, 'dicoms', P2), 0o755)  # let pytest clean up
  assert done.returncode == cli.EXIT_DROPPED, done.stderr
  assert 'Traceback' not in done.stderr
  errors = sorted((r['path'], r['stage']) for r in read_errors(out).to_pylist())
  assert errors == [
    (f'dicoms/{P1}/2.dcm', schema.STAGE_READ),
    (f'dicoms/{P2}', schema.STAGE_LIST),
  ]
  written = (
    open_dataset(out).to_table(columns=['patient_id', 'slice_index']).to_pylist()
  )
  assert sorted((r['patient_id'], r['slice_index']) for r in written) == [
    (P1, 1),
    (P1, 3),
  ]


@pytest.mark.parametrize(
  'relative, shown',
  [
    (b'dicoms/SCD0000101/\xff\xfe.dcm', 'dicoms/SCD0000101/\\xff\\xfe.dcm'),
    (b'dicoms/SCD0000101/4\xe9.dcm', 'dicoms/SCD0000101/4\\xe9.dcm'),
    (b'dicoms/\xe9t\xe9/1.dcm', 'dicoms/\\xe9t\\xe9'),  # the folder, not entered
    (b'dicoms/SCD0000102/\x80/1.dcm', 'dicoms/SCD0000102/\\x80'),
    (
      b'contourfiles/SC-HF-I-101/i-contours/IM-0001-0001-icontour-manual\xc3(.txt',
      'contourfiles/SC-HF-I-101/i-contours/IM-0001-0001-icontour-manual\\xc3(.txt',
    ),
    (b'\xff\xff/x.dcm', None),  # outside dicoms/ and contourfiles/: never listed
  ],
)
def test_a_name_that_is_not_utf8_is_one_list_row_and_the_run_goes_on(
  base, tmp_path, relative, shown
):
  root, _ = base
  path = os.fsencode(root) + b'/' + relative
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(b'not a dicom')
  code, written, found, errors = _run(root, str(tmp_path / 'OUT'))
  assert written == ALL_SLICES and found == []
  if shown is None:
    assert code == cli.EXIT_OK and errors == []
    return
  assert code == cli.EXIT_DROPPED
  assert errors == [(shown, schema.STAGE_LIST)]
  (row,) = read_errors(str(tmp_path / 'OUT')).to_pylist()
  assert 'not valid UTF-8' in row['error']


def test_the_reconciliation_says_what_happened_to_a_patient_without_contours(
  base, tmp_path
):
  """A patient without contours whose slice files are all empty: the
  reconciliation row states the facts it knows (slice files, no masks) and
  claims nothing about writing; the errors hold each file."""
  root, _ = base
  shutil.rmtree(os.path.join(root, 'contourfiles', O2))
  for k in (1, 2, 3):
    _write(root, f'dicoms/{P2}/{k}.dcm', b'')
  out = str(tmp_path / 'OUT')
  code, written, found, errors = _run(root, out)
  assert written == [(P1, k) for k in (1, 2, 3)]
  assert found == [(P2, O2, schema.MISSING_CONTOURS)]
  (row,) = [
    r for r in read_reconciliation(out).to_pylist() if r['status'] != schema.MATCHED
  ]
  assert row['detail'].endswith('; its 3 slice files have no masks'), row
  assert 'written' not in row['detail']
  assert errors == [(f'dicoms/{P2}/{k}.dcm', schema.STAGE_DECODE) for k in (1, 2, 3)]
  assert code == cli.EXIT_DROPPED


def test_pixel_data_that_disagrees_with_its_header_is_one_decode_row_each(
  base, tmp_path
):
  """Through the whole job (native reader in the worker, pydicom isolated in a
  child): data longer or shorter than the header, and encapsulated items
  under an uncompressed syntax, are each one decode row with the numbers;
  nothing of theirs is written."""
  import struct

  root, _ = base
  image = ROWS * COLUMNS * 2
  item = b'\xfe\xff\x00\xe0'
  cases = {
    1: (b'\x01\x00' * (image // 2 + 3), '6 more than the header describes'),
    2: (b'\x01\x00' * (image // 2 - 4), f'pixel data holds {image - 8} bytes'),
    3: (
      item
      + struct.pack('<I', 0)
      + item
      + struct.pack('<I', image - 16)
      + b'\x05\x00' * ((image - 16) // 2),
      'encapsulated (fragmented) pixel data',
    ),
  }
  for k, (raw, _) in cases.items():
    _write(root, f'dicoms/{P1}/{k}.dcm', _dicom_bytes(tmp_path, PixelData=raw))
  out = str(tmp_path / 'OUT')
  code, written, found, errors = _run(root, out)
  assert written == [(P2, k) for k in (1, 2, 3)]
  assert errors == [(f'dicoms/{P1}/{k}.dcm', schema.STAGE_DECODE) for k in cases]
  reasons = {r['path']: r['error'] for r in read_errors(out).to_pylist()}
  for k, (_, expected) in cases.items():
    assert expected in reasons[f'dicoms/{P1}/{k}.dcm'], reasons
  assert code == cli.EXIT_DROPPED


@contextlib.contextmanager
def _unblocked_after(fifo, seconds):
  """After ``seconds``, a writer opens and closes ``fifo`` again and again,
  so that a read blocked on it ends (at EOF) and the test fails rather than
  hangs. Yields the list of times it had to."""
  unblocked, done = [], threading.Event()

  def unblock():
    if done.wait(seconds):
      return
    while not done.wait(0.2):
      try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        unblocked.append(True)
      except OSError:  # no reader has it open
        pass

  thread = threading.Thread(target=unblock, daemon=True)
  thread.start()
  try:
    yield unblocked
  finally:
    done.set()
    thread.join()


@pytest.mark.parametrize('kind', ['a FIFO', 'a symlink to a FIFO in the tree'])
def test_a_fifo_as_link_csv_is_one_row_and_never_waited_on(base, tmp_path, kind):
  """link.csv a FIFO (or a link to one): the launcher's survey and the
  listing never open it, never wait: one links row, every folder unlinked
  (was: the run hung forever)."""
  root, _ = base
  link_csv = os.path.join(root, layout.LINK_FILE)
  os.remove(link_csv)
  fifo = link_csv if kind == 'a FIFO' else os.path.join(root, 'dicoms', 'links')
  os.mkfifo(fifo)
  if fifo != link_csv:
    os.symlink(fifo, link_csv)
  with _unblocked_after(fifo, 60) as unblocked:
    code, written, found, errors = _run(root, str(tmp_path / 'OUT'))
  assert unblocked == []  # nothing waited on the FIFO
  assert written == [] and found == sorted(UNLINKED_BOTH) and code == cli.EXIT_DROPPED
  assert (layout.LINK_FILE, schema.STAGE_LINKS) in errors
  (row,) = [
    r
    for r in read_errors(str(tmp_path / 'OUT')).to_pylist()
    if r['stage'] == schema.STAGE_LINKS
  ]
  assert row['error'] == 'cannot read: not a regular file (a FIFO); not read'


def test_a_name_swapped_for_a_link_or_fifo_while_it_is_read_never_leads_out(
  tmp_path,
):
  """Another process swaps a slice's name between a file of the tree, a
  symlink to a file outside the input and a FIFO, as fast as it can, while
  it is read 3,000 times: each read gives the tree's bytes or refuses the
  name; none gives the outside file's bytes or waits on the FIFO (was: a
  link swapped in between the check and the open was followed)."""
  from transforms.contract.errors import UnsafePathError
  from transforms.io import files

  root = tmp_path / 'DATA'
  (root / 'dicoms').mkdir(parents=True)
  (root / 'inside.dcm').write_bytes(b'inside')
  (tmp_path / 'secret').write_bytes(b'outside')
  os.mkfifo(root / 'fifo')
  swapper = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import os, sys\n'
      'root, secret = sys.argv[1:]\n'
      "name, spare = os.path.join(root, 'dicoms', '1.dcm'), os.path.join(root, 's')\n"
      "kinds = [(os.link, os.path.join(root, 'inside.dcm')), (os.symlink, secret),\n"
      "         (os.symlink, os.path.join(root, 'fifo'))]\n"
      'while True:\n'
      '  for make, target in kinds:\n'
      '    make(target, spare)\n'
      '    os.replace(spare, name)\n',
      str(root),
      str(tmp_path / 'secret'),
    ]
  )
  seen = {'inside': 0, 'refused': 0}
  try:
    while not (root / 'dicoms' / '1.dcm').exists():
      time.sleep(0.01)
    with _unblocked_after(str(root / 'fifo'), 30) as unblocked:
      for _ in range(3000):
        try:
          data = files.read_input(str(root), 'dicoms/1.dcm')
        except (OSError, UnsafePathError):
          seen['refused'] += 1
          continue
        assert data == b'inside'  # b'' if a read had to be unblocked
        seen['inside'] += 1
  finally:
    swapper.kill()
    swapper.wait()
  assert unblocked == []  # no read waited on the FIFO
  assert seen['inside'] and seen['refused'], seen  # both happened
