"""Duplicates (issue 12, point 6): the same file, the same SOP Instance UID or
identical pixels under two slices, and identical contour files."""

from __future__ import annotations

import os
import shutil

import pydicom
import pytest

from beam_pipeline.dataset import open_dataset, read_reconciliation, read_summary
from beam_pipeline.launch import cli
from beam_pipeline.tools import sample, verify
from transforms import duplicates
from transforms.contract import metrics, schema, splits

ROWS = COLUMNS = 16


def _member(pid, index, split='train'):
  return (f'dicoms/{pid}/{index}.dcm', pid, f'O{pid}', index, split)


def test_groups_sharing_a_slice_are_one_row_and_the_plan_names_every_copy():
  a, b, c = _member('A', 1), _member('B', 4, 'test'), _member('C', 2, 'val')
  groups = [
    ('slice', 'the same SOP Instance UID', (a, b)),
    ('slice', 'identical pixels', (a, b)),
    ('slice', 'identical pixels', (b, c)),
  ]
  rows, plan = duplicates.plan(groups, drop=False)
  (row,) = rows
  assert row['status'] == schema.DUPLICATE_SLICE and row['patient_id'] == 'A'
  for path in ('dicoms/A/1.dcm', 'dicoms/B/4.dcm', 'dicoms/C/2.dcm'):
    assert path in row['detail']
  assert 'identical pixels and the same SOP Instance UID' in row['detail']
  assert plan['flags'] == [
    ['A', 1, 'duplicate_slice'],
    ['B', 4, 'duplicate_slice'],
    ['C', 2, 'duplicate_slice'],
  ]
  assert plan['drop'] == []
  assert plan['moves'] == {'B': ['test', 'train'], 'C': ['val', 'train']}
  assert 'patient B moved from split test to train' in row['detail']


def test_drop_keeps_the_first_copy_by_path_and_moves_nobody():
  a, b = _member('A', 1), _member('B', 4, 'test')
  rows, plan = duplicates.plan([('slice', 'identical pixels', (b, a))], drop=True)
  assert plan == {
    'flags': [['A', 1, 'duplicate_slice']],
    'drop': [['B', 4]],
    'moves': {},
  }
  assert 'kept dicoms/A/1.dcm' in rows[0]['detail']


def test_identical_contours_are_one_row_flagging_every_slice():
  members = (
    ('contourfiles/OA/i-contours/IM-0001-0001-icontour-manual.txt', 'A', 'OA', 1, 'i'),
    ('contourfiles/OB/i-contours/IM-0001-0007-icontour-manual.txt', 'B', 'OB', 7, 'i'),
  )
  rows, plan = duplicates.plan([('contour', 'identical bytes', members)], drop=False)
  (row,) = rows
  assert row['status'] == schema.DUPLICATE_CONTOUR
  assert members[0][0] in row['detail'] and members[1][0] in row['detail']
  assert plan['flags'] == [['A', 1, 'duplicate_contour'], ['B', 7, 'duplicate_contour']]
  assert plan['moves'] == {}


def _two_splits(fractions: str) -> tuple[str, str]:
  """Two generated patient ids that hash into different splits."""
  parsed = splits.parse_fractions(fractions)
  ids = [f'SCD{n:07d}' for n in range(101, 140)]
  first = ids[0]
  other = next(
    p
    for p in ids
    if splits.assign_split(p, parsed) != splits.assign_split(first, parsed)
  )
  return first, other


def _tree(tmp_path, fractions):
  """Patients P (first) and Q (another split): Q's slice 2 is a copy of P's
  slice 3; Q's slice 5 has P's SOP Instance UID with other pixels; P's
  slice 1 inner contour is copied onto Q's slice 4."""
  p, q = _two_splits(fractions)
  root = str(tmp_path / 'DATA')
  os.makedirs(root)
  with open(os.path.join(root, 'link.csv'), 'w') as f:
    f.write(f'patient_id,original_id\n{p},O-{p}\n{q},O-{q}\n')
  for pid in (p, q):
    os.makedirs(os.path.join(root, 'dicoms', pid))
    for k in range(1, 7):
      path = os.path.join(root, 'dicoms', pid, f'{k}.dcm')
      sample.write_dicom(path, sample.expected_image(pid, k, ROWS, COLUMNS), pid, k)
    folder = os.path.join(root, 'contourfiles', f'O-{pid}', 'i-contours')
    os.makedirs(folder)
    for k in (1, 4):
      square = 2 + k if pid == p else 9 - k
      with open(os.path.join(folder, f'IM-0001-{k:04d}-icontour-manual.txt'), 'w') as f:
        f.write(
          f'{square} {square}\n{square + 5} {square}\n{square + 5} {square + 5}\n'
        )
  shutil.copy(
    os.path.join(root, 'dicoms', p, '3.dcm'), os.path.join(root, 'dicoms', q, '2.dcm')
  )
  uid = pydicom.dcmread(os.path.join(root, 'dicoms', p, '6.dcm')).SOPInstanceUID
  ds = pydicom.dcmread(os.path.join(root, 'dicoms', q, '5.dcm'))
  ds.SOPInstanceUID = uid
  ds.save_as(os.path.join(root, 'dicoms', q, '5.dcm'))
  shutil.copy(
    os.path.join(
      root, 'contourfiles', f'O-{p}', 'i-contours', 'IM-0001-0001-icontour-manual.txt'
    ),
    os.path.join(
      root, 'contourfiles', f'O-{q}', 'i-contours', 'IM-0001-0004-icontour-manual.txt'
    ),
  )
  return root, p, q


def _rows(out):
  table = open_dataset(out).to_table(
    columns=['patient_id', 'slice_index', 'split', 'qa_flags', 'pixel_xxh3']
  )
  return {(r['patient_id'], r['slice_index']): r for r in table.to_pylist()}


def _summary(out):
  return read_summary(out)


FRACTIONS = '0.5,0.5,0'


def test_copies_are_reported_flagged_and_kept_in_one_split(tmp_path):
  root, p, q = _tree(tmp_path, FRACTIONS)
  out = str(tmp_path / 'OUT')
  args = ['--input', root, '--output', out, '--split', FRACTIONS]
  assert cli.main(args) == cli.EXIT_OK  # every copy written and flagged
  assert cli.main([*args, '--overwrite', '--strict']) == cli.EXIT_STRICT
  found = sorted(
    (r['status'], r['detail'])
    for r in read_reconciliation(out).to_pylist()
    if r['status'] != schema.MATCHED
  )
  assert [status for status, _ in found] == [
    schema.DUPLICATE_CONTOUR,
    schema.DUPLICATE_SLICE,
    schema.DUPLICATE_SLICE,
  ]
  contour, (_, same_file), (_, same_uid) = found
  if f'dicoms/{p}/3.dcm' not in same_file:
    same_file, same_uid = same_uid, same_file
  assert same_file.startswith(
    f'2 copies of one image (identical pixels and the same SOP Instance UID): '
    f'dicoms/{p}/3.dcm, dicoms/{q}/2.dcm; all written, flagged duplicate_slice'
  )
  assert same_uid.startswith(
    f'2 copies of one image (the same SOP Instance UID): dicoms/{p}/6.dcm, '
    f'dicoms/{q}/5.dcm'
  )
  # Both join the first of their splits in train, val, test order.
  parsed = splits.parse_fractions(FRACTIONS)
  split = min((splits.assign_split(x, parsed) for x in (p, q)), key=splits.SPLITS.index)
  moved = q if splits.assign_split(q, parsed) != split else p
  assert f'patient {moved} moved from split' in same_file + same_uid
  assert contour[1].startswith('2 identical contour files: ')
  rows = _rows(out)
  assert len(rows) == 12  # every copy written
  flagged = {k for k, r in rows.items() if 'duplicate_slice' in r['qa_flags']}
  assert flagged == {(p, 3), (q, 2), (p, 6), (q, 5)}
  contour_flagged = {k for k, r in rows.items() if 'duplicate_contour' in r['qa_flags']}
  assert contour_flagged == {(p, 1), (q, 4)}
  # No two copies of one image in different splits; each patient in one split.
  by_image = {}
  for r in rows.values():
    by_image.setdefault(r['pixel_xxh3'], set()).add(r['split'])
  assert all(len(v) == 1 for v in by_image.values())
  assert {r['split'] for r in rows.values()} == {split}
  counters = _summary(out)['counters']
  assert counters[metrics.qa_counter('duplicate_slice')] == 4
  assert counters[metrics.qa_counter('duplicate_contour')] == 2
  assert counters[metrics.split_slices_counter(split)] == 12
  assert counters[metrics.split_patients_counter(split)] == 2
  assert counters[metrics.reconciliation_counter(schema.DUPLICATE_SLICE)] == 2
  assert verify.verify(out).failures == []


def test_drop_duplicates_writes_the_first_copy_only(tmp_path):
  root, p, q = _tree(tmp_path, FRACTIONS)
  out = str(tmp_path / 'OUT')
  args = ['--input', root, '--output', out, '--split', FRACTIONS, '--drop-duplicates']
  assert cli.main(args) == cli.EXIT_DROPPED
  rows = _rows(out)
  assert set(rows) == {(pid, k) for pid in (p, q) for k in range(1, 7)} - {
    (q, 2),
    (q, 5),
  }
  assert rows[p, 3]['qa_flags'] == ['duplicate_slice']
  assert {r['split'] for r in rows.values() if r['patient_id'] == q} != {
    rows[p, 1]['split']
  }  # nobody moved: the copies are gone
  summary = _summary(out)
  assert summary['counters'][metrics.SLICES_WRITTEN] == 10
  assert summary['dropped_duplicates'] == {q: 2}
  assert verify.verify(out).failures == []


def test_a_tree_without_copies_has_no_duplicate_rows(tmp_path):
  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=3, slices=4, rows=ROWS, columns=COLUMNS)
  out = str(tmp_path / 'OUT')
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_OK
  copies = {schema.DUPLICATE_SLICE, schema.DUPLICATE_CONTOUR}
  assert not [k for k, r in _rows(out).items() if copies & set(r['qa_flags'])]
  assert not os.path.exists(os.path.join(out, schema.DUPLICATES_PLAN_FILE))


@pytest.mark.parametrize('blank', [0, 100])
def test_constant_images_are_not_copies(tmp_path, blank):
  """Two blank slices of one value are not duplicates of each other."""
  import numpy as np

  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=1, slices=3, rows=ROWS, columns=COLUMNS)
  pid = sorted(os.listdir(os.path.join(root, 'dicoms')))[0]
  for k in (1, 2):
    path = os.path.join(root, 'dicoms', pid, f'{k}.dcm')
    sample.write_dicom(path, np.full((ROWS, COLUMNS), blank, np.int16), pid, k)
  out = str(tmp_path / 'OUT')
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_OK


def test_a_row_group_with_nothing_to_change_keeps_its_types():
  """A rewritten shard's other row groups (no flag, no move) keep the exact
  schema: an all-empty qa_flags column must not become list<null>."""
  import collections

  import pyarrow as pa

  from beam_pipeline.launch import duplicate_plan as applying

  rows = []
  for k in (1, 2):
    row = dict.fromkeys(schema.SLICE_SCHEMA.names)
    row.update(patient_id='A', slice_index=k, split='train', qa_flags=[])
    rows.append(row)
  table = pa.Table.from_pylist(rows, schema=schema.SLICE_SCHEMA)
  counts, dropped = collections.Counter(), collections.Counter()
  changed = applying.changed(table, applying.Plan({}, set(), {}), counts, dropped)
  assert changed.schema.equals(schema.SLICE_SCHEMA)
  assert changed.equals(table) and not counts and not dropped
