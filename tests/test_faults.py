"""Faults and re-runs: a run killed half-way, then run again."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from beam_pipeline import cli, sample, verify
from beam_pipeline.contract import schema as s
from beam_pipeline.dataset import open_dataset

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


def _files_under(folder):
  return any(files for _, _, files in os.walk(folder))


def _kill_half_way(args, out):
  """Starts the job, SIGKILLs its process group once it is writing, returns."""
  job = subprocess.Popen(
    [sys.executable, SCRIPT, *args],
    start_new_session=True,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  staging = os.path.join(out, s.STAGING_DIR)
  deadline = time.monotonic() + 120
  while not _files_under(staging) and time.monotonic() < deadline:
    time.sleep(0.01)  # killed as soon as the first shard is being written
  still_running = job.poll() is None
  os.killpg(job.pid, signal.SIGKILL)
  job.wait()
  assert still_running, 'the job ended before it could be killed: make the tree larger'


def test_killed_first_run_looks_incomplete_and_a_rerun_completes(big_tree, tmp_path):
  root, manifest = big_tree
  out = str(tmp_path / 'OUT')
  _kill_half_way(['--input', root, '--output', out], out)
  assert not os.path.exists(os.path.join(out, s.SUMMARY_FILE))
  assert not os.path.exists(os.path.join(out, s.SLICES_DIR))
  # The same command again: leftovers are cleared, the dataset is complete.
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_OK
  assert not os.path.exists(os.path.join(out, s.STAGING_DIR))
  assert verify.verify(out).failures == []
  assert open_dataset(out).count_rows() == len(manifest.slices)


def test_killed_overwrite_leaves_the_previous_dataset_intact(big_tree, tmp_path):
  root, manifest = big_tree
  out = str(tmp_path / 'OUT')
  assert cli.main(['--input', root, '--output', out, '--labeled-only']) == 0
  before = _snapshot(out)
  _kill_half_way(['--input', root, '--output', out, '--overwrite'], out)
  after = {k: v for k, v in _snapshot(out).items() if not k.startswith(s.STAGING_DIR)}
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
  staging = os.path.join(out, s.STAGING_DIR)
  deadline = time.monotonic() + 120
  while not _files_under(staging) and time.monotonic() < deadline:
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
  after = {k: v for k, v in _snapshot(out).items() if not k.startswith(s.STAGING_DIR)}
  assert after == before
