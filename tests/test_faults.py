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
