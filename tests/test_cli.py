"""The command line: --help without the heavy imports, every option in it."""

import os
import subprocess
import sys

from beam_pipeline import arguments

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
