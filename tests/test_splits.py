"""The split rule: small cohorts fill every non-zero split, existing patients
never move, and large cohorts follow the hash."""

import json
import os
import random
import shutil
import time

import pyarrow.compute as pc
import pytest

from beam_pipeline.dataset import open_dataset, versions
from beam_pipeline.launch import cli, incremental
from beam_pipeline.tools import sample
from transforms.assign import PINNED_FILE
from transforms.contract import layout, splits


def _cohort(n: int, seed: int = 0) -> dict[str, float]:
  rng = random.Random(seed)
  ids = [f'P{rng.randrange(10**9):09d}' for _ in range(n)]
  return {pid: splits.patient_position(pid) for pid in ids}


def _sizes(split_of: dict[str, str]) -> dict[str, int]:
  return {name: list(split_of.values()).count(name) for name in splits.SPLITS}


@pytest.mark.parametrize(
  'fractions', [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.98, 0.01, 0.01), (0.9, 0.1, 0.0)]
)
@pytest.mark.parametrize('n', [2, 3, 4, 5, 7, 12])
def test_every_non_zero_split_gets_a_patient_when_there_are_enough(n, fractions):
  wanted = [s for s, f in zip(splits.SPLITS, fractions, strict=True) if f > 0]
  for seed in range(20):
    sizes = _sizes(splits.assign(_cohort(n, seed), fractions))
    assert sum(sizes.values()) == n
    if n >= len(wanted):
      assert all(sizes[s] >= 1 for s in wanted), (seed, sizes)
    assert all(sizes[s] == 0 for s in splits.SPLITS if s not in wanted)


def test_the_nearest_patient_fills_an_empty_split():
  # five positions chosen so that the hash rule leaves val empty
  positions = {'a': 0.10, 'b': 0.40, 'c': 0.75, 'd': 0.93, 'e': 0.99}
  got = splits.assign(positions, (0.8, 0.1, 0.1))
  # c is 0.05 below val's [0.8, 0.9), d 0.03 above it: d moves
  assert got == {'a': 'train', 'b': 'train', 'c': 'train', 'd': 'val', 'e': 'test'}
  # a split's last patient never moves: one train patient, val empty
  got = splits.assign({'a': 0.5, 'd': 0.93, 'e': 0.99}, (0.8, 0.1, 0.1))
  assert got == {'a': 'train', 'd': 'val', 'e': 'test'}


def test_the_choice_does_not_depend_on_the_order_of_the_patients():
  cohort = _cohort(5, seed=3)
  items = list(cohort.items())
  random.Random(1).shuffle(items)
  assert splits.assign(dict(items), (0.8, 0.1, 0.1)) == splits.assign(
    cohort, (0.8, 0.1, 0.1)
  )


def test_adding_patients_never_moves_an_existing_one():
  fractions = (0.8, 0.1, 0.1)
  for seed in range(30):
    everyone = list(_cohort(40, seed).items())
    split_of: dict[str, str] = {}
    for size in (1, 2, 3, 5, 8, 13, 40):
      now = splits.assign(dict(everyone[:size]), fractions, pinned=split_of)
      assert {pid: now[pid] for pid in split_of} == split_of
      if size >= 3:
        assert all(_sizes(now)[s] for s in splits.SPLITS), (seed, size)
      split_of = now


def test_a_removed_patient_moves_nobody():
  fractions = (0.8, 0.1, 0.1)
  cohort = _cohort(6, seed=5)
  first = splits.assign(cohort, fractions)
  gone = next(pid for pid, s in first.items() if s == 'val')
  rest = {pid: p for pid, p in cohort.items() if pid != gone}
  again = splits.assign(rest, fractions, pinned=first)
  assert again == {pid: first[pid] for pid in rest}


def test_large_cohorts_follow_the_hash():
  fractions = (0.7, 0.2, 0.1)
  cohort = _cohort(2000, seed=9)
  got = splits.assign(cohort, fractions)
  assert got == {pid: splits.split_at(p, fractions) for pid, p in cohort.items()}


# ---- through the pipeline: a small cohort, then one more patient


def _split_of(out) -> dict[str, str]:
  table = open_dataset(out).to_table(columns=['patient_id', 'split'])
  pairs = table.group_by(['patient_id', 'split']).aggregate([])
  found = dict(
    zip(pairs['patient_id'].to_pylist(), pairs['split'].to_pylist(), strict=True)
  )
  assert len(found) == len(pc.unique(table['patient_id']))  # one split each
  return found


def _without_last_patient(tree, aside):
  """Moves the tree's last patient (dicoms, contours, link row) to ``aside``."""
  with open(os.path.join(tree, 'link.csv')) as f:
    lines = f.read().splitlines()
  pid, oid = lines[-1].split(',')
  os.makedirs(aside)
  shutil.move(os.path.join(tree, 'dicoms', pid), os.path.join(aside, 'dicom'))
  shutil.move(os.path.join(tree, 'contourfiles', oid), os.path.join(aside, 'contour'))
  with open(os.path.join(tree, 'link.csv'), 'w') as f:
    f.write('\n'.join(lines[:-1]) + '\n')
  return lines, pid, oid


def test_a_five_patient_run_fills_every_split_and_a_sixth_moves_nobody(tmp_path):
  tree, out = str(tmp_path / 'DATA'), str(tmp_path / 'OUT')
  sample.make_tree(tree, patients=6, slices=3, rows=32, columns=32)
  lines, pid, oid = _without_last_patient(tree, str(tmp_path / 'aside'))
  run = lambda *extra: cli.main(['--input', tree, '--output', out, *extra])  # noqa: E731
  assert run() == cli.EXIT_OK
  first = _split_of(out)
  assert len(first) == 5 and set(first.values()) == set(splits.SPLITS)
  record = versions.record(out)
  assert record['splits'] == first and record['split_fractions'] == [0.8, 0.1, 0.1]
  counters = record['counters']
  assert all(counters[f'patients_{s}'] >= 1 for s in splits.SPLITS)

  # the sixth patient comes back: incremental, then --full, nobody moves
  shutil.move(str(tmp_path / 'aside' / 'dicom'), os.path.join(tree, 'dicoms', pid))
  shutil.move(
    str(tmp_path / 'aside' / 'contour'), os.path.join(tree, 'contourfiles', oid)
  )
  with open(os.path.join(tree, 'link.csv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  time.sleep(layout.RACY_NS / 1e9 + 0.1)
  assert run() == cli.EXIT_OK
  second = _split_of(out)
  assert versions.record(out)['patients']['added'] == 1
  assert {p: second[p] for p in first} == first
  assert run('--full') == cli.EXIT_OK
  assert _split_of(out) == second

  # other fractions draw again; a version recorded before splits were
  # (no "splits" key) pins its patients to their hash split
  assert run('--split', '0.5,0.25,0.25') == cli.EXIT_OK
  drawn = _split_of(out)
  assert set(drawn.values()) == set(splits.SPLITS)
  legacy = {k: v for k, v in versions.record(out).items() if k != 'splits'}
  start = incremental.Start(0, legacy, {}, 'test', None)
  staging = str(tmp_path / 'staging')
  os.makedirs(staging)
  path = incremental.stage_pinned(staging, start, (0.8, 0.1, 0.1))
  assert os.path.basename(path) == PINNED_FILE
  with open(path) as f:
    assert json.load(f) == {'hashed': sorted(drawn)}
  other = incremental.Start(0, versions.record(out), {}, 'test', None)
  assert incremental.stage_pinned(staging, other, (0.8, 0.1, 0.1)) is None
  # pins are by patient_id, whatever the input (a moved tree keeps them)
  moved = incremental.stage_pinned(staging, other, (0.5, 0.25, 0.25))
  with open(moved) as f:
    assert json.load(f) == {'pinned': drawn}


def test_a_pinned_patient_outside_the_fill_keeps_its_split(tmp_path):
  from transforms.assign import _RuleFn
  from transforms.io import stores

  path = str(tmp_path / PINNED_FILE)
  with open(path, 'w') as f:
    json.dump({'pinned': {'P': 'val', 'A': 'train'}}, f)
  rule = _RuleFn((0.8, 0.1, 0.1), path, stores.StoreConfig())
  rule.setup()
  # P has no contours under --labeled-only: not among the positions
  (got,) = rule.process({'A': 0.1, 'B': 0.3, 'C': 0.95})
  assert got['P'] == 'val' and got['A'] == 'train'
  assert set(got) == {'P', 'A', 'B', 'C'}
