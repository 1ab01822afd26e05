"""The docs stay true: the README's commands, the column, status, option and
flag tables of docs/, and every link between them."""

import os
import re

import pyarrow as pa
import pytest
from pydicom import datadict

from transforms.contract import columns, schema
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


def test_output_doc_documents_every_status_and_stage():
  output = _read('docs', 'OUTPUT.md')
  for name in (*schema.STATUSES, *schema.STAGES):
    assert f'| `{name}` |' in output, name


def test_output_doc_says_which_statuses_drop_an_input_as_the_exit_code_does():
  """The status table's last column is metrics.dropped_statuses: ``yes``,
  ``no`` or ``with `--drop-duplicates` ``."""
  from transforms.contract import metrics

  output = _read('docs', 'OUTPUT.md')
  table = output.split('| status | meaning | dropped |\n| --- | --- | --- |\n', 1)[1]
  said = {}
  for line in table.split('\n\n', 1)[0].splitlines():
    status, _, dropped = (cell.strip() for cell in line.strip('|').split(' | '))
    said[status.strip('`')] = dropped.split(':')[0]
  assert list(said) == list(schema.STATUSES)
  for status, dropped in said.items():
    if status in metrics.dropped_statuses():
      assert dropped == 'yes', status
    elif status in metrics.dropped_statuses(drop_duplicates=True):
      assert dropped == 'with `--drop-duplicates`', status
    else:
      assert dropped == 'no', status


def test_output_doc_column_table_is_the_column_table():
  output = _read('docs', 'OUTPUT.md')
  block = re.search(
    r'<!-- slice columns:.*?-->\n(.*?)\n<!-- end of slice columns -->', output, re.S
  )
  assert block, 'the generated slice-column block is missing from docs/OUTPUT.md'
  assert block.group(1) == columns.markdown_table(), (
    'docs/OUTPUT.md out of date: paste the output of python -m '
    'transforms.contract.columns'
  )


def test_every_slice_column_is_in_the_schema_with_its_description():
  assert [c.name for c in columns.SLICE_COLUMNS] == schema.SLICE_SCHEMA.names
  for column in columns.SLICE_COLUMNS:
    field = schema.SLICE_SCHEMA.field(column.name)
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


def test_options_doc_lists_every_option_of_the_pipeline():
  from beam_pipeline.launch import arguments

  options = _read('docs', 'OPTIONS.md')
  for action in arguments.help_parser()._actions:
    for flag in action.option_strings:
      if flag.startswith('--') and flag not in ('--help', arguments.HELP_BEAM):
        assert f'| `{flag}` |' in options, flag


def test_output_doc_flag_table_names_every_quality_flag_and_no_other():
  output = _read('docs', 'OUTPUT.md')
  section = output.split('## Quality checks', 1)[1].split('\n\n| flag |', 1)[1]
  table = section.split('\n\n', 1)[0]
  named = set(
    re.findall(
      r'`([a-z_]+)`', ''.join(line.split('|')[1] for line in table.splitlines()[2:])
    )
  )
  assert named == set(FLAGS)


def test_the_readme_is_a_map():
  assert len(_read('README.md').splitlines()) <= 250


def _anchor(heading):
  """GitHub's anchor of a Markdown heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


_DOCS = ['README.md', 'BENCHMARKS.md'] + [
  os.path.join('docs', name) for name in sorted(os.listdir(os.path.join(REPO, 'docs')))
]


@pytest.mark.parametrize('doc', _DOCS)
def test_every_link_between_the_docs_leads_somewhere(doc):
  text = _read(doc)
  here = os.path.dirname(os.path.join(REPO, doc))
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'[a-z]+:', target):
      continue  # another site
    path, _, anchor = target.partition('#')
    full = (
      os.path.normpath(os.path.join(here, path)) if path else os.path.join(REPO, doc)
    )
    assert os.path.exists(full), f'{doc}: {target} leads nowhere'
    if anchor and full.endswith('.md'):
      with open(full) as f:
        headings = [_anchor(h) for h in re.findall(r'^#+ (.*)$', f.read(), re.M)]
      assert anchor in headings, f'{doc}: {target}: no such heading'
