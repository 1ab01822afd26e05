"""The README stays true: its commands and its schema table."""

import os
import re

from beam_pipeline import schema as s

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
  with open(os.path.join(REPO, *parts)) as f:
    return f.read()


def _bash_blocks(text):
  return re.findall(r'```bash\n(.*?)\n```', text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
  readme_test_command = _bash_blocks(_read('README.md'))[1]
  ci_lines = [
    line
    for line in _read('.ci', 'run').splitlines()
    if line and not line.startswith('#')
  ]
  assert ci_lines[-1] == readme_test_command
  assert 'pytest' in readme_test_command


def test_readme_starts_with_install_and_run():
  first = _bash_blocks(_read('README.md'))[0]
  assert 'pip install -r requirements.txt' in first
  assert first.endswith('python run_pipeline.py')


def test_readme_documents_every_slice_column_with_its_type():
  documented = {}
  for names, kind in re.findall(
    r'^\| (`\w+`(?:, `\w+`)*) \| ([^|]+) \|', _read('README.md'), flags=re.M
  ):
    for name in re.findall(r'`(\w+)`', names):
      documented.setdefault(name, kind)
  for field in s.SLICE_SCHEMA:
    assert field.name in documented, field.name
    kind = documented[field.name]
    if field.type == 'int32':
      assert kind.strip() == 'int32', field.name
    elif field.type == 'string':
      assert kind.strip() == 'string', field.name


def test_readme_documents_every_status_and_stage():
  readme = _read('README.md')
  for name in (*s.STATUSES, *s.STAGES):
    assert f'| `{name}` |' in readme, name
