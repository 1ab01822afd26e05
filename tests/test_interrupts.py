"""Signals: deferred while publishing; every descendant process stopped."""

import os
import signal
import subprocess
import sys
import time

import pytest

from beam_pipeline.launch import interrupts


def test_a_signal_while_publishing_waits_until_the_block_is_done(handled):
  finished = []
  with pytest.raises(interrupts.Interrupted) as caught:
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.05)
      finished.append(True)
  assert finished and caught.value.published and caught.value.exit_code == 143
  interrupts.handle_signals()  # a new run (until then later signals are recorded)
  with pytest.raises(interrupts.Interrupted) as caught:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(1)
  assert not caught.value.published and caught.value.exit_code == 130


def test_a_wrapped_interrupt_is_found_behind_the_runners_exception():
  try:
    try:
      raise interrupts.Interrupted(signal.SIGINT)
    except interrupts.Interrupted as e:
      raise RuntimeError('while running a DoFn') from e
  except RuntimeError as e:
    assert interrupts.interrupted_by(e).signum == signal.SIGINT
  assert interrupts.interrupted_by(ValueError('no')) is None


_STOPPER = """
import subprocess, sys, time
from beam_pipeline.launch import interrupts
sleeper = [sys.executable, '-c', 'import time; time.sleep(60)']
spawner = f'import subprocess, time; subprocess.Popen({sleeper!r}); time.sleep(60)'
subprocess.Popen([sys.executable, '-c', spawner])
deadline = time.monotonic() + 20
while len(interrupts.descendants()) < 2 and time.monotonic() < deadline:
  time.sleep(0.05)
found = interrupts.descendants()
stopped = interrupts.stop_descendants()
print(len(found), stopped, sum(interrupts._alive(pid) for pid in found))
"""


def test_stop_descendants_ends_children_and_grandchildren():
  """In a process of its own: here it would also stop pytest's children."""
  done = subprocess.run(
    [sys.executable, '-c', _STOPPER], capture_output=True, text=True, timeout=60
  )
  assert done.returncode == 0, done.stderr
  found, stopped, alive = map(int, done.stdout.split())
  assert found == stopped == 2 and alive == 0
