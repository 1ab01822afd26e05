"""The README's five-minute path, run as a user would: its commands on a
generated output, and its Python blocks as scripts from another folder."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from beam_pipeline.launch import cli
from beam_pipeline.tools import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section() -> str:
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  start = text.index('## Five minutes on your own data')
  return text[start : text.index('\n## ', start + 1)]


def _blocks(kind: str) -> list[str]:
  return re.findall(rf'```{kind}\n(.*?)```', _section(), flags=re.S)


@pytest.fixture(scope='module')
def five(tmp_path_factory):
  base = tmp_path_factory.mktemp('five')
  data, out = str(base / 'DATA'), str(base / 'OUT')
  sample.make_tree(data, patients=5, slices=6, rows=32, columns=32)
  return base, data, out


def test_the_commands_run(five):
  base, data, out = five
  (bash,) = _blocks('bash')
  lines = [line for line in bash.splitlines() if line and not line.startswith('#')]
  assert lines[0] == 'pip install -e . pandas'
  for line in lines[1:]:
    words = shlex.split(line.split('#')[0])
    assert words[0] == 'cardiac-mri'
    words = [
      w.replace('/path/to/DATA', data)
      .replace('/path/to/OUT', out)
      .replace('/path/to/QA', str(base / 'QA'))
      for w in words
    ]
    assert cli.command(words[1:]) == cli.EXIT_OK, line
  assert os.path.exists(base / 'QA' / 'index.html')


# What each block must have done (a loop that ran no batch fails here).
_CHECKS = {
  'iter_batches': "assert batch['label'].max() > 0\n"
  "assert batch['image'].dtype.name == 'float32'",
  'SliceDataset': 'assert label.max() > 0 and tuple(image.shape[1:2]) == (1,)',
}


@pytest.mark.parametrize('needle', sorted(_CHECKS))
def test_the_python_blocks_run_from_another_folder(five, needle):
  base, data, out = five
  if not os.path.exists(os.path.join(out, 'slices')):
    assert cli.main(['--input', data, '--output', out]) == cli.EXIT_OK
  if needle == 'SliceDataset':
    pytest.importorskip('torch')
  (block,) = [b for b in _blocks('python') if needle in b]
  script = block.replace('/path/to/OUT', out) + '\n' + _CHECKS[needle] + '\n'
  elsewhere = base / f'elsewhere-{needle}'
  elsewhere.mkdir()
  done = subprocess.run(
    [sys.executable, '-c', script],
    cwd=elsewhere,
    env={**os.environ, 'PYTHONPATH': REPO},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-2000:]
