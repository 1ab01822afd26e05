"""The command line, run as a user runs it: the real entry point in a
subprocess, its exit code, its output and the files it leaves."""

import os
import subprocess
import sys

import pytest

from beam_pipeline import arguments, cli

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


def _cli(tmp_path, *args):
  """The real entry point, run in ``tmp_path``: (exit code, stdout, stderr)."""
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, 'run_pipeline.py'), *args],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  return done.returncode, done.stdout, done.stderr


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
