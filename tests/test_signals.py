"""A second SIGINT or SIGTERM while the first is being handled.

The first signal raises ``Interrupted`` in the main thread; while it is
handled (the lock let go, the id map's parts removed, the workers stopped,
the line printed) every later one is only recorded, so that handling ends as
it began: one line, the first signal's exit code, no traceback. A new run
(``handle_signals``) arms the handlers again. Whatever ``main()`` lets out
is caught by the entry point too (``cli.entry``).

The whole run stuck on a server, signalled again and again, is in
tests/test_retries.py (``test_a_burst_of_signals_*``).
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from beam_pipeline.launch import interrupts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_signal_while_the_first_is_handled_is_only_recorded(handled):
  cleaned = []
  with pytest.raises(interrupts.Interrupted) as caught:
    try:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)
    finally:  # where the lock is let go and the id map's parts removed
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.2)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)
      cleaned.append(True)
  assert cleaned == [True]
  assert caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143
  assert interrupts.ignored() == [signal.SIGINT, signal.SIGTERM]
  interrupts.handle_signals()  # a new run: the next signal raises again
  assert interrupts.ignored() == []
  with pytest.raises(interrupts.Interrupted) as caught:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
  assert caught.value.signum == signal.SIGINT


def test_a_signal_after_one_held_back_by_publishing_is_only_recorded(handled):
  cleaned = []
  with pytest.raises(interrupts.Interrupted) as caught:
    try:
      with interrupts.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
    finally:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.2)
      cleaned.append(True)
  assert cleaned == [True]
  assert caught.value.published and caught.value.signum == signal.SIGINT
  assert interrupts.ignored() == [signal.SIGTERM]


# A run whose launch is interrupted (SIGTERM), and which gets a second
# signal while the first is handled: in the wait for its descendants to go,
# or after main() has printed its line and returned.
_SECOND = """
import os, signal, sys, time
from beam_pipeline.launch import cli, interrupts

def stuck(argv, started):
  os.kill(os.getpid(), signal.SIGTERM)
  time.sleep(30)

def stop_after_another(grace=3.0):
  os.kill(os.getpid(), signal.{second})
  time.sleep(0.3)
  return real_stop(grace)

real_main, real_stop = cli.main, interrupts.stop_descendants
cli._run = stuck
if {while_stopping}:
  interrupts.stop_descendants = stop_after_another
else:
  def main_then_another(argv):
    code = real_main(argv)
    os.kill(os.getpid(), signal.{second})
    time.sleep(0.3)
    return code
  cli.main = main_then_another
sys.exit(cli.entry(['--input', 'DATA', '--output', 'OUT']))
"""

SECOND = {
  'SIGINT while the workers are stopped': ('SIGINT', True),
  'SIGTERM while the workers are stopped': ('SIGTERM', True),
  'SIGINT after main returned': ('SIGINT', False),
}


@pytest.mark.parametrize('case', SECOND)
def test_a_second_signal_is_one_line_and_the_first_signals_exit_code(case, tmp_path):
  second, while_stopping = SECOND[case]
  script = _SECOND.format(second=second, while_stopping=while_stopping)
  env = dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp_path))
  began = time.monotonic()
  done = subprocess.run(
    [sys.executable, '-c', script],
    cwd=str(tmp_path),
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert time.monotonic() - began < 25  # neither the 30 s sleep nor a hang
  assert 'Traceback' not in done.stderr, done.stderr
  assert done.returncode == 143, done.stderr
  assert done.stderr.splitlines() == [
    'interrupted (SIGTERM): nothing published, previous dataset untouched'
  ]


def test_an_interrupt_main_lets_out_is_one_line_and_its_exit_code(tmp_path):
  """An Interrupted that escapes main() (a signal where it has no handler
  around it) is caught by the entry point: its line, exit 143."""
  script = (
    'import signal, sys\n'
    'from beam_pipeline.launch import cli, interrupts\n'
    'def escaping(argv):\n'
    '  interrupts.handle_signals()\n'
    '  raise interrupts.Interrupted(signal.SIGTERM)\n'
    'cli.main = escaping\n'
    "sys.exit(cli.entry(['--input', 'DATA', '--output', 'OUT']))\n"
  )
  done = subprocess.run(
    [sys.executable, '-c', script],
    cwd=str(tmp_path),
    env=dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp_path)),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert 'Traceback' not in done.stderr, done.stderr
  assert done.returncode == 143
  assert done.stderr.splitlines() == [
    'interrupted (SIGTERM): nothing published, previous dataset untouched'
  ]


def test_a_signal_after_the_run_has_ended_changes_nothing(tmp_path):
  """A signal that comes once main() has returned (here while stdout is
  flushed) is only recorded: the run's exit code stands, nothing is said."""
  script = (
    'import os, signal, sys, time\n'
    'from beam_pipeline.launch import cli, interrupts\n'
    'from beam_pipeline.tools import pipe\n'
    'def done(argv):\n'
    '  interrupts.handle_signals()\n'
    '  return 0\n'
    'real_flush = pipe.flush\n'
    'def flush():\n'
    '  os.kill(os.getpid(), signal.SIGTERM)\n'
    '  time.sleep(0.3)\n'
    '  real_flush()\n'
    'cli.main, pipe.flush = done, flush\n'
    "sys.exit(cli.entry(['--input', 'DATA', '--output', 'OUT']))\n"
  )
  done = subprocess.run(
    [sys.executable, '-c', script],
    cwd=str(tmp_path),
    env=dict(os.environ, PYTHONPATH=REPO, TMPDIR=str(tmp_path)),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert (done.returncode, done.stderr) == (0, '')
