"""The command line, run as a user runs it: the real entry point in a
subprocess, its exit code, its output and the files it leaves."""

import os
import re
import subprocess
import sys

import pytest

from beam_pipeline import arguments, cli, console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import sys
from beam_pipeline import cli
code = cli.main(['--help'])
heavy = sorted(m for m in ('apache_beam', 'pydicom', 'pyarrow') if m in sys.modules)
print('exit', code, 'heavy', heavy)
"""


def test_help_lists_every_option_without_importing_beam_pydicom_or_pyarrow():
  done = subprocess.run(
    [sys.executable, '-c', _PROBE], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip().endswith('exit 0 heavy []'), done.stdout[-500:]
  for action in arguments.help_parser()._actions:
    for flag in action.option_strings:
      assert flag in done.stdout, flag
  assert '--runner' in done.stdout  # where Beam's own options are described


def test_run_pipeline_help_exits_zero():
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, 'run_pipeline.py'), '--help'],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert done.returncode == 0 and '--labeled-only' in done.stdout, done.stderr


def _cli(tmp_path, *args, env=None):
  """The real entry point, run in ``tmp_path``: (exit code, stdout, stderr)."""
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, 'run_pipeline.py'), *args],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  return done.returncode, done.stdout, done.stderr


# A console line of ours: a log line of the project's loggers, or the summary.
_OURS = re.compile(
  r'^\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) (beam_pipeline|transforms|worker)[.:]'
)


@pytest.mark.parametrize(
  'args, expected',
  [
    (
      ['--labelled-only'],
      'unknown option --labelled-only; did you mean --labeled-only?',
    ),
    (['--ouput', 'X'], 'unknown option --ouput; did you mean --output?'),
    (['--labeled_only'], 'unknown option --labeled_only; did you mean --labeled-only?'),
    (
      ['--direct_num_worker=2'],
      'unknown option --direct_num_worker; did you mean --direct_num_workers?',
    ),
    (['--chunk-size', 'many'], "argument --chunk-size: invalid int value: 'many'"),
    (['--image-codec', 'jpeg'], "argument --image-codec: invalid choice: 'jpeg'"),
    (['stray'], "unexpected argument 'stray'"),
  ],
)
def test_a_mistyped_option_is_one_line_and_exit_two_before_anything_runs(
  tmp_path, args, expected
):
  code, out, err = _cli(tmp_path, '--output', str(tmp_path / 'OUT'), *args)
  assert code == cli.EXIT_USAGE
  assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  assert expected in err
  assert os.listdir(tmp_path) == []  # no sample generated, no output made


def test_help_beam_lists_beams_options_and_ours(tmp_path):
  code, out, _ = _cli(tmp_path, '--help-beam')
  assert code == 0
  for flag in ('--runner', '--direct_num_workers', '--s3_endpoint_url', '--chunk-size'):
    assert flag in out, flag


def test_the_quick_start_runs_twice_and_leaves_nothing_behind(tmp_path):
  """The README's first command, twice: the built-in sample's own output is
  replaced; nothing is left in the temp folder; the console holds only our
  lines (Beam's notes and import-time warnings go to the log file)."""
  work, temp = tmp_path / 'work', tmp_path / 'tmp'
  work.mkdir()
  temp.mkdir()
  env = {**os.environ, 'TMPDIR': str(temp)}
  env.pop(console.LOG_DIR_VARIABLE, None)
  for _ in range(2):
    code, out, err = _cli(work, env=env)
    assert code == cli.EXIT_OK, err
    assert 'Summary' in out
    assert all(_OURS.match(line) for line in err.splitlines()), err
  assert sorted(os.listdir(work)) == ['output', 'sample_data']
  assert os.listdir(temp) == ['cardiac-mri-logs']  # no beam-temp* folder
  logs = sorted(os.listdir(temp / 'cardiac-mri-logs'))
  assert len(logs) == 2
  assert 'apache_beam' in (temp / 'cardiac-mri-logs' / logs[0]).read_text()


def test_a_users_own_output_is_not_replaced_without_overwrite(tmp_path):
  assert _cli(tmp_path)[0] == cli.EXIT_OK  # the sample and its output
  code, _, err = _cli(tmp_path, '--input', 'sample_data')
  assert code == cli.EXIT_USAGE and 'already holds a dataset' in err
  assert _cli(tmp_path, '--input', 'sample_data', '--output', 'mine')[0] == 0
  code, _, err = _cli(tmp_path, '--output', 'mine')
  assert code == cli.EXIT_USAGE and '--overwrite' in err


_NOISE = """
import logging, sys
from beam_pipeline import console
path = console.configure_logging(sys.argv[1])
logging.warning('apitools not found, and bigquery client libraries are missing')
logging.getLogger('apache_beam.runners').info('Running stage 12')
logging.getLogger('beam_pipeline.pipeline').info('reading DATA')
try:
  1 / 0
except ZeroDivisionError:
  logging.getLogger('beam_pipeline.cli').error('the pipeline failed', exc_info=True)
"""


def test_the_console_shows_our_lines_and_the_log_file_keeps_everything(tmp_path):
  log = tmp_path / 'run.log'
  done = subprocess.run(
    [sys.executable, '-c', _NOISE, str(log)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert done.returncode == 0, done.stderr
  (line,) = done.stderr.splitlines()
  assert line.endswith('INFO beam_pipeline.pipeline: reading DATA')
  kept = log.read_text()
  for text in ('apitools not found', 'Running stage 12', 'reading DATA'):
    assert text in kept
  assert 'Traceback' in kept and 'ZeroDivisionError' in kept
