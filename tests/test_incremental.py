"""Incremental runs (issue 32, deliverable 4): a run into an existing dataset
decodes only the patients whose inputs changed, and its version equals a full
run's over the same input, row for row, in every table."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from beam_pipeline.dataset import versions
from beam_pipeline.launch import cli
from beam_pipeline.tools import sample, verify
from tests.helpers import dataset_tables
from transforms.contract import layout, metrics, schema

# Splits spread over all three, so duplicate detection moves patients.
SPLIT = '0.4,0.3,0.3'
BASE = ('contour_without_dicom', 'truncated_dicom', 'bad_contour', 'stray_files')


def _run(*args) -> int:
  return cli.main(list(args))


def _again(tree, out, *options) -> int:
  return _run('--input', tree, '--output', out, '--split', SPLIT, *options)


def _settle():
  """Waits until every file written so far is older than the racy window
  (layout.RACY_NS): a file changed just before it is listed has no stamp,
  and its patient is decoded again whatever its fingerprint."""
  time.sleep(layout.RACY_NS / 1e9 + 0.1)


def _patients(out) -> dict:
  return versions.record(out)['patients']


def _same_as_full(tree, out, tmp_path, *options):
  """Checks the latest version of ``out`` against a full run of ``tree``
  into a new output: every table row for row, and the counters."""
  full = str(tmp_path / f'FULL-{len(os.listdir(tmp_path))}')
  assert _run('--input', tree, '--output', full, '--split', SPLIT, *options) in (
    cli.EXIT_OK,
    cli.EXIT_DROPPED,
  )
  mine, theirs = dataset_tables(out), dataset_tables(full)
  for table in mine:
    assert mine[table] == theirs[table], table
  counted = lambda c: {  # noqa: E731
    k: v for k, v in c.items() if k != metrics.SLICE_BYTES_READ and v
  }
  assert counted(versions.record(out)['counters']) == counted(
    versions.record(full)['counters']
  )
  assert verify.verify(out).failures == []


def _grown(tmp_path, patients: int) -> str:
  """A tree of the same generator with more patients (the first ones equal)."""
  path = str(tmp_path / f'GROWN-{patients}')
  sample.make_tree(path, patients=patients, slices=6, rows=16, columns=16)
  return path


def _add_patient(tree: str, grown: str, pid: str, oid: str) -> None:
  for top, owner in ((layout.DICOM_DIR, pid), (layout.CONTOUR_DIR, oid)):
    shutil.copytree(os.path.join(grown, top, owner), os.path.join(tree, top, owner))
  with open(os.path.join(tree, layout.LINK_FILE), 'a') as f:
    f.write(f'{pid},{oid}\n')


def _links(tree: str) -> list[str]:
  with open(os.path.join(tree, layout.LINK_FILE)) as f:
    return f.read().splitlines()


def _write_links(tree: str, lines: list[str]) -> None:
  with open(os.path.join(tree, layout.LINK_FILE), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def _contour(tree: str, oid: str, kind: str, k: int) -> str:
  return os.path.join(
    tree, layout.CONTOUR_DIR, oid, f'{kind}-contours', layout.contour_name(kind, k)
  )


@pytest.fixture
def grown_base(tmp_path):
  tree = str(tmp_path / 'TREE')
  sample.make_tree(tree, patients=5, slices=6, rows=16, columns=16, quirks=BASE)
  return tree, _grown(tmp_path, 8)


def test_an_incremental_run_decodes_only_what_changed_and_equals_a_full_run(
  grown_base, tmp_path, capsys
):
  tree, grown = grown_base
  out = str(tmp_path / 'OUT')
  _settle()
  assert _again(tree, out) == cli.EXIT_DROPPED
  first = dataset_tables(out)
  assert _patients(out)['added'] == 5

  # nothing changed: every patient kept, no slice decoded, the same rows
  assert _again(tree, out) == cli.EXIT_DROPPED
  assert _patients(out) == {
    'added': 0,
    'replaced': 0,
    'removed': 0,
    'kept': 5,
    'from_version': 0,
    'why_full': '',
    'slices_decoded': 0,
  }
  assert dataset_tables(out) == first
  assert 'kept' in capsys.readouterr().out
  files_before = versions.table_files(out, schema.SLICES_DIR, 1)
  assert files_before == versions.table_files(out, schema.SLICES_DIR, 0)

  # a new patient whose folder holds a copy of a kept patient's slice:
  # duplicate flags (and a split move) reach the kept patient's old rows
  pids = [line.split(',') for line in _links(grown)[1:]]
  new_pid, new_oid = pids[5]
  _add_patient(tree, grown, new_pid, new_oid)
  shutil.copy(
    os.path.join(tree, layout.DICOM_DIR, pids[0][0], '2.dcm'),
    os.path.join(tree, layout.DICOM_DIR, new_pid, '7.dcm'),
  )
  _settle()
  assert _again(tree, out) == cli.EXIT_DROPPED
  assert _patients(out)['added'] == 1 and _patients(out)['kept'] == 5
  flagged = [
    r for r in dataset_tables(out)['slices'] if schema.DUPLICATE_SLICE in r['qa_flags']
  ]
  assert {r['patient_id'] for r in flagged} == {pids[0][0], new_pid}
  _same_as_full(tree, out, tmp_path)

  # a contour changed (only that), a slice removed, a slice rewritten
  contour = _contour(tree, pids[1][1], 'i', 3)
  with open(contour) as f:
    vertices = f.read().splitlines()
  with open(contour, 'w') as f:
    f.write('\n'.join(f'{float(x) + 1:.2f} {y}' for x, y in map(str.split, vertices)))
  os.remove(os.path.join(tree, layout.DICOM_DIR, pids[2][0], '5.dcm'))
  sample.write_dicom(
    os.path.join(tree, layout.DICOM_DIR, pids[3][0], '4.dcm'),
    sample.expected_image(pids[3][0], 40, 16, 16),
    pids[3][0],
    4,
  )
  _settle()
  assert _again(tree, out) == cli.EXIT_DROPPED
  assert _patients(out)['replaced'] == 3
  assert _patients(out)['kept'] == 3  # pids[0], pids[4] and the new one
  _same_as_full(tree, out, tmp_path)

  # the copied slice removed (the kept patient's duplicate flag goes), a
  # patient removed from link.csv, two link rows that swap their contours
  os.remove(os.path.join(tree, layout.DICOM_DIR, new_pid, '7.dcm'))
  lines = _links(tree)
  header, rows = lines[0], lines[1:]
  rows = [r for r in rows if not r.startswith(pids[4][0] + ',')]
  swap = {pids[1][0]: pids[2][1], pids[2][0]: pids[1][1]}
  rows = [f'{pid},{swap.get(pid, oid)}' for pid, oid in (r.split(',') for r in rows)]
  _write_links(tree, [header, *rows])
  _settle()
  assert _again(tree, out) == cli.EXIT_DROPPED
  found = _patients(out)
  assert (found['removed'], found['replaced'], found['kept']) == (1, 3, 2)
  assert not any(
    schema.DUPLICATE_SLICE in r['qa_flags'] for r in dataset_tables(out)['slices']
  )
  _same_as_full(tree, out, tmp_path)

  # --full: every patient decoded again, one new version, the same rows
  before = dataset_tables(out)
  assert (
    _run('--input', tree, '--output', out, '--split', SPLIT, '--full')
    == cli.EXIT_DROPPED
  )
  assert _patients(out)['why_full'] == '--full' and _patients(out)['kept'] == 0
  assert dataset_tables(out) == before
  for version in versions.versions(out):
    assert verify.verify(out, version=version).failures == []


def test_changed_options_and_dropped_duplicates_decode_again(grown_base, tmp_path):
  tree, grown = grown_base
  out = str(tmp_path / 'OUT')
  pid = _links(tree)[1].split(',')[0]
  copy = os.path.join(tree, layout.DICOM_DIR, pid, '7.dcm')
  shutil.copy(os.path.join(tree, layout.DICOM_DIR, pid, '2.dcm'), copy)
  _settle()
  assert _again(tree, out) == cli.EXIT_DROPPED
  # an option that changes rows: every patient decoded again
  drop = ('--split', SPLIT, '--drop-duplicates')
  assert _run('--input', tree, '--output', out, *drop) == cli.EXIT_DROPPED
  found = _patients(out)
  assert found['why_full'] == 'options that change rows differ from version 0'
  assert found['kept'] == 0
  assert versions.record(out)['dropped_duplicates'] == {pid: 1}
  # the patient with a dropped copy is decoded again; the others are kept
  pids = [line.split(',') for line in _links(grown)[1:]]
  _add_patient(tree, grown, *pids[6])
  _settle()
  assert _run('--input', tree, '--output', out, *drop) == cli.EXIT_DROPPED
  found = _patients(out)
  assert (found['added'], found['replaced'], found['kept']) == (1, 1, 4)
  _same_as_full(tree, out, tmp_path, '--drop-duplicates')


def test_a_racy_file_is_never_trusted():
  now = time.time_ns()
  assert layout.disk_stamp(10, now - 10**9, now - 10**9, now) == ''
  old = now - 3 * layout.RACY_NS
  assert layout.disk_stamp(10, old, old, now) == f'10:{old}:{old}'
  assert layout.disk_stamp(10, old, now, now) == ''  # a chmod or write: ctime
  stamped = layout.DicomFile('P', 1, 'dicoms/P/1.dcm', stamp='10:1:1')
  unknown = stamped._replace(stamp='')
  link = ('P', 'O', None)
  assert layout.fingerprint(link, [stamped], []) != ''
  assert layout.fingerprint(link, [stamped, unknown], []) == ''
  assert layout.fingerprint(link, [stamped], []) != layout.fingerprint(
    ('P', 'O2', None), [stamped], []
  )
  moved = stamped._replace(stamp='10:2:2')
  assert layout.fingerprint(link, [moved], []) != layout.fingerprint(
    link, [stamped], []
  )


def test_an_incremental_publish_killed_at_any_step_leaves_the_previous_version(
  tmp_path, monkeypatch
):
  """The publish of an incremental run (a rewritten file of kept rows, the
  changed patient's new file, a commit that removes some files and keeps
  others) killed at each of its steps: version 0 reads as before, row for
  row; the latest is version 0 or the whole new one; the next run succeeds."""
  from tests.test_versions import _capture, _kill_trials, _published_state

  tree = str(tmp_path / 'TREE')
  sample.make_tree(tree, patients=3, slices=5, rows=16, columns=16)
  out = str(tmp_path / 'OUT')
  _settle()
  assert _again(tree, out) == cli.EXIT_OK
  before = _published_state(out)
  oid = _links(tree)[2].split(',')[1]
  with open(_contour(tree, oid, 'i', 3), 'a') as f:
    f.write('1.00 1.00\n')
  _settle()
  captured = _capture(
    monkeypatch, None, '--input', tree, '--output', out, '--split', SPLIT
  )
  assert captured['removed'] and captured['kept'] is not None
  new, killed = _kill_trials(captured, str(tmp_path / 'work'), 4)
  for again, _ in killed:
    state = _published_state(again)
    assert state[0] == before[0], again
    assert set(state) in ({0}, {0, 1}) and state.get(1, new) == new, again
    assert _again(tree, again) == cli.EXIT_OK
    assert verify.verify(again).failures == []
    assert dataset_tables(again) == new


def test_labeled_only_counts_kept_patients_as_a_full_run_does(tmp_path):
  """Under --labeled-only a patient without contour files has no slice to
  decode and is not counted; kept, it is not counted either."""
  tree = str(tmp_path / 'TREE')
  sample.make_tree(
    tree, patients=3, slices=6, rows=16, columns=16, quirks=['missing_contours']
  )
  grown = _grown(tmp_path, 8)
  out = str(tmp_path / 'OUT')
  _settle()
  assert _again(tree, out, '--labeled-only') == cli.EXIT_OK
  _add_patient(tree, grown, *_links(grown)[5].split(','))
  _settle()
  assert _again(tree, out, '--labeled-only') == cli.EXIT_OK
  found = _patients(out)
  assert (found['added'], found['kept']) == (1, 4)  # the one without contours too
  _same_as_full(tree, out, tmp_path, '--labeled-only')


def test_a_failure_that_may_not_happen_again_is_tried_again(tmp_path):
  """A patient with an error row of an I/O error, a PACS retrieve or a
  decoder that timed out, crashed or ran out of memory is decoded again by
  the next run (a full run would try again); one of a broken file is not."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  from beam_pipeline.launch import incremental

  rows = [
    ('A', schema.STAGE_READ, 'cannot read: [Errno 5] Input/output error'),
    ('B', schema.STAGE_FETCH, 'HTTP 503 after 5 attempts'),
    ('C', schema.STAGE_DECODE, 'decoder timed out after 120 s'),
    ('D', schema.STAGE_DECODE, 'decoder process crashed (killed by signal SIGSEGV)'),
    ('E', schema.STAGE_DECODE, 'MemoryError: '),
    ('F', schema.STAGE_DECODE, 'not a DICOM file: no DICM prefix'),
    ('G', schema.STAGE_CONTOUR, 'line 3: not two numbers'),
  ]
  table = pa.table(
    {
      'patient_id': [r[0] for r in rows],
      'path': [f'dicoms/{r[0]}/1.dcm' for r in rows],
      'stage': [r[1] for r in rows],
      'error': [r[2] for r in rows],
    }
  ).cast(schema.ERROR_SCHEMA)
  os.makedirs(tmp_path / 'errors')
  pq.write_table(table, tmp_path / 'errors' / 'part-0.parquet')
  record = {
    'input': 'IN',
    incremental.INPUTS: {pid: 'f' for pid in 'ABCDEFG'},
    incremental.SETTINGS: 's',
    'files': {'errors/part-0.parquet': {}},
  }
  retry = incremental.to_retry(str(tmp_path), record)
  assert retry == set('ABCDE')
  start = incremental.begin(0, record, None, 'IN', 's', False, False, frozenset(retry))
  assert start.incremental and set(start.previous) == {'F', 'G'}
