"""Faults and re-runs: a run killed half-way, then run again."""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from beam_pipeline.dataset import open_dataset, read_summary, versions
from beam_pipeline.launch import cli, lock, publish
from beam_pipeline.tools import sample, verify
from tests.helpers import dataset_tables
from transforms.contract import schema

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'run_pipeline.py')


@pytest.fixture(scope='module')
def big_tree(tmp_path_factory):
  """Enough slices that a run lasts several seconds."""
  root = str(tmp_path_factory.mktemp('faults') / 'DATA')
  return root, sample.make_tree(
    root, patients=30, slices=120, rows=96, columns=96, contour_every=10
  )


def _snapshot(out):
  """Every file under ``out`` with the SHA-256 of its content."""
  found = {}
  for dirpath, _, files in os.walk(out):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        found[os.path.relpath(path, out)] = hashlib.sha256(f.read()).hexdigest()
  return found


def _staging_has_files(out):
  """True once a run's staging folder (OUT/_incomplete-<run id>/) holds a file."""
  names = os.listdir(out) if os.path.isdir(out) else []
  return any(
    files
    for name in names
    if name.startswith(schema.STAGING_DIR)
    for _, _, files in os.walk(os.path.join(out, name))
  )


def _published(out):
  """The snapshot of what a run publishes: no staging folder, no lock file."""
  return {
    k: v
    for k, v in _snapshot(out).items()
    if not k.startswith(schema.STAGING_DIR) and k != lock.LOCK_FILE
  }


def _kill_half_way(args, out):
  """Starts the job, SIGKILLs its process group once it is writing, returns."""
  job = subprocess.Popen(
    [sys.executable, SCRIPT, *args],
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.monotonic() + 120
  while not _staging_has_files(out) and time.monotonic() < deadline:
    time.sleep(0.01)  # killed as soon as the first shard is being written
  still_running = job.poll() is None
  os.killpg(job.pid, signal.SIGKILL)
  job.wait()
  assert still_running, 'the job ended before it could be killed: make the tree larger'


def test_killed_first_run_looks_incomplete_and_a_rerun_completes(big_tree, tmp_path):
  root, manifest = big_tree
  out = str(tmp_path / 'OUT')
  _kill_half_way(['--input', root, '--output', out], out)
  assert not os.path.exists(os.path.join(out, schema.SLICES_DIR, versions.LOG_DIR))
  # The same command again: leftovers are cleared, the dataset is complete.
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_OK
  assert not [n for n in os.listdir(out) if n.startswith(schema.STAGING_DIR)]
  assert not os.path.exists(os.path.join(out, lock.LOCK_FILE))  # taken over, released
  assert verify.verify(out).failures == []
  assert open_dataset(out).count_rows() == len(manifest.slices)


def test_killed_overwrite_leaves_the_previous_dataset_intact(big_tree, tmp_path):
  root, manifest = big_tree
  out = str(tmp_path / 'OUT')
  assert cli.main(['--input', root, '--output', out, '--labeled-only']) == 0
  before = _snapshot(out)
  _kill_half_way(['--input', root, '--output', out, '--overwrite'], out)
  after = _published(out)
  assert after == before
  assert verify.verify(out).failures == []
  assert cli.main(['--input', root, '--output', out, '--overwrite']) == 0
  assert verify.verify(out).failures == []
  assert open_dataset(out).count_rows() == len(manifest.slices)  # no mix, no duplicates


def _remaining(group: int) -> list[str]:
  """The processes still in a process group."""
  found = subprocess.run(['pgrep', '-g', str(group)], capture_output=True, text=True)
  return found.stdout.split()


MULTI = ['--direct_running_mode=multi_processing', '--direct_num_workers=2']


@pytest.mark.parametrize(
  'extra, signum, to_group',
  [
    ([], signal.SIGINT, True),  # Ctrl-C in a terminal: the whole group
    (MULTI, signal.SIGINT, True),  # ... worker processes get it too
    (MULTI, signal.SIGTERM, False),  # a supervisor stopping the job's pid
  ],
  ids=['ctrl-c', 'ctrl-c-workers', 'sigterm-workers'],
)
def test_an_interrupt_is_one_line_and_leaves_nothing_running(
  big_tree, tmp_path, extra, signum, to_group
):
  root, _ = big_tree
  out = str(tmp_path / 'OUT')
  assert cli.main(['--input', root, '--output', out, '--labeled-only']) == 0
  before = _snapshot(out)
  job = subprocess.Popen(
    [sys.executable, SCRIPT, '--input', root, '--output', out, '--overwrite', *extra],
    start_new_session=True,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 120
  while not _staging_has_files(out) and time.monotonic() < deadline:
    time.sleep(0.01)
  assert job.poll() is None, 'the job ended before it could be interrupted'
  if to_group:
    os.killpg(job.pid, signum)
  else:
    os.kill(job.pid, signum)
  _, err = job.communicate(timeout=60)
  assert job.returncode == 128 + signum, err
  assert 'Traceback' not in err
  name = signal.Signals(signum).name
  assert err.splitlines()[-1] == (
    f'interrupted ({name}): nothing published, previous dataset untouched'
  )
  time.sleep(0.5)
  assert _remaining(job.pid) == []  # no worker or decoder left behind
  after = _published(out)
  assert after == before


@pytest.fixture(scope='module')
def other_tree(tmp_path_factory):
  """A second, different tree: a mix of two runs would show in the rows."""
  root = str(tmp_path_factory.mktemp('other') / 'DATA')
  sample.make_tree(root, patients=12, slices=40, rows=64, columns=64, contour_every=4)
  return root


@pytest.fixture(scope='module')
def references(big_tree, other_tree, tmp_path_factory):
  """One full run of each tree, alone: what a finished race must equal."""
  base = tmp_path_factory.mktemp('references')
  found = {}
  for name, root in (('big', big_tree[0]), ('other', other_tree)):
    out = str(base / name)
    assert cli.main(['--input', root, '--output', out]) == cli.EXIT_OK
    found[name] = dataset_tables(out)
  return found


def _start(root, out, extra):
  return subprocess.Popen(
    [sys.executable, SCRIPT, '--input', root, '--output', out, '--overwrite', *extra],
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


@pytest.mark.parametrize('delay', [0.0, 0.5, 3.0])
@pytest.mark.parametrize(
  'first, second',
  [([], []), (MULTI, []), ([], MULTI)],
  ids=['in-process', 'workers-first', 'workers-second'],
)
def test_two_runs_into_one_output_never_mix_and_the_loser_changes_nothing(
  big_tree, other_tree, references, tmp_path, delay, first, second
):
  """Two runs of different trees into one --output, the second started
  ``delay`` s after the first: one refuses (exit 2, one line naming the
  holder) or they run one after the other; the dataset is always one whole
  run's, and nothing of a staging folder or the lock is left."""
  out = str(tmp_path / 'OUT')
  assert cli.main(['--input', other_tree, '--output', out]) == cli.EXIT_OK
  one = _start(big_tree[0], out, first)
  time.sleep(delay)
  two = _start(other_tree, out, second)
  results = []
  for job in (one, two):
    _, err = job.communicate(timeout=300)
    results.append((job.returncode, err))
  for code, err in results:
    assert code in (cli.EXIT_OK, cli.EXIT_USAGE), err
    if code == cli.EXIT_USAGE:
      (line,) = err.splitlines()
      assert 'is in use by another run (pid ' in line, line
      assert f'{lock.LOCK_FILE}); wait for it to finish' in line
  assert cli.EXIT_OK in [code for code, _ in results]
  final = dataset_tables(out)
  assert final in (references['big'], references['other'])
  made_from = read_summary(out)['input']
  assert final == references['big' if made_from == big_tree[0] else 'other']
  assert sorted(os.listdir(out)) == sorted(publish.DATA_ENTRIES)


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(big_tree, tmp_path):
  root, manifest = big_tree
  out = str(tmp_path / 'OUT')
  _kill_half_way(['--input', root, '--output', out], out)
  with open(os.path.join(out, lock.LOCK_FILE)) as f:
    left = json.load(f)
  assert left['host'] == socket.gethostname() and left['pid'] > 0
  done = subprocess.run(
    [sys.executable, SCRIPT, '--input', root, '--output', out],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == cli.EXIT_OK, done.stderr
  warning = [x for x in done.stderr.splitlines() if 'taking over the lock' in x]
  assert len(warning) == 1 and f'pid {left["pid"]} on {left["host"]}' in warning[0]
  assert open_dataset(out).count_rows() == len(manifest.slices)
  assert sorted(os.listdir(out)) == sorted(publish.DATA_ENTRIES)
