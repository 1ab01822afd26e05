"""The README stays true: its commands, its column table and its statuses."""

import os
import re

import pyarrow as pa
from pydicom import datadict

from transforms.contract import columns
from transforms.contract import schema as s
from transforms.contract.flags import FLAGS

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


def test_readme_documents_every_status_and_stage():
  readme = _read('README.md')
  for name in (*s.STATUSES, *s.STAGES):
    assert f'| `{name}` |' in readme, name


def test_readme_column_table_is_the_column_table():
  readme = _read('README.md')
  block = re.search(
    r'<!-- slice columns:.*?-->\n(.*?)\n<!-- end of slice columns -->', readme, re.S
  )
  assert block, 'the generated slice-column block is missing from the README'
  assert block.group(1) == columns.markdown_table(), (
    'README out of date: paste the output of python -m transforms.contract.columns'
  )


def test_every_slice_column_is_in_the_schema_with_its_description():
  assert [c.name for c in columns.SLICE_COLUMNS] == s.SLICE_SCHEMA.names
  for column in columns.SLICE_COLUMNS:
    field = s.SLICE_SCHEMA.field(column.name)
    assert field.type == column.type and field.nullable == column.nullable
    assert field.metadata[b'description'].decode() == column.description


def test_header_columns_name_real_dicom_tags_keywords_and_vrs():
  """Each header column's keyword, tag and VR agree with pydicom's dictionary
  (PS3.6), and its Arrow type can hold that VR's values."""
  kinds = {
    'US': pa.types.is_integer,
    'IS': pa.types.is_integer,
    'DS': pa.types.is_floating,
    'UI': pa.types.is_string,
    'CS': pa.types.is_string,
  }
  for column in columns.HEADER_COLUMNS:
    source = column.dicom
    assert datadict.tag_for_keyword(source.keyword) == source.tag, column.name
    assert datadict.dictionary_VR(source.tag) == source.vr, column.name
    value_type = column.type.value_type if column.values else column.type
    assert kinds[source.vr](value_type), column.name
    multiplicity = datadict.dictionary_VM(source.tag)
    assert multiplicity == (str(column.values) if column.values else '1'), column.name


def test_readme_options_table_lists_every_option_of_the_pipeline():
  from beam_pipeline.launch import arguments

  readme = _read('README.md')
  for action in arguments.help_parser()._actions:
    for flag in action.option_strings:
      if flag.startswith('--') and flag not in ('--help', arguments.HELP_BEAM):
        assert f'| `{flag}` |' in readme, flag


def test_readme_flag_table_names_every_quality_flag_and_no_other():
  readme = _read('README.md')
  section = readme.split('### Quality checks', 1)[1].split('\n\n| flag |', 1)[1]
  table = section.split('\n\n', 1)[0]
  named = set(
    re.findall(
      r'`([a-z_]+)`', ''.join(line.split('|')[1] for line in table.splitlines()[2:])
    )
  )
  assert named == set(FLAGS)
