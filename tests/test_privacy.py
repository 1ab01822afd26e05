"""What leaves the pipeline: the header columns against DICOM PS3.15, and
the slices whose pixels may show text.

The Basic Application Level Confidentiality Profile (PS3.15 Annex E, Table
E.1-1) lists what must be removed (X), emptied (Z), replaced with a dummy
(D) or replaced with a UID (U); an attribute it does not list is kept. The
table comes from the pinned dicom-anonymizer package (its 2026c edition of
the standard), so it is data, not a list written here.
"""

import glob
import os

import pydicom
import pytest
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as ps315

from beam_pipeline.dataset import read_summary
from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from tests.helpers import dataset_tables
from transforms.contract import columns, flags, metrics, schema
from transforms.decode import _native
from transforms.decode.dicom import decode_dicom


def _actions() -> dict[tuple[int, int], set[str]]:
  """{(group, element): the profile's action lists naming it}."""
  found: dict[tuple[int, int], set[str]] = {}
  for name in dir(ps315):
    if name.endswith('_TAGS') and name != 'ALL_TAGS':
      for tag in getattr(ps315, name):
        found.setdefault(tuple(tag[:2]), set()).add(name.removesuffix('_TAGS'))
  return found


def test_the_profile_table_is_there_and_names_what_identifies():
  actions = _actions()
  assert len(actions) > 500
  assert 'X' in actions[(0x0010, 0x1040)]  # PatientAddress: removed
  assert any('Z' in a for a in actions[(0x0010, 0x0010)])  # PatientName: emptied
  assert 'U' in actions[(0x0008, 0x0018)]  # SOPInstanceUID: a new UID
  assert (0x0028, 0x0010) not in actions  # Rows: kept


def test_every_header_column_is_kept_or_replaced_by_the_basic_profile():
  actions = _actions()
  assert columns.HEADER_COLUMNS
  for column in columns.HEADER_COLUMNS:
    source = column.dicom
    group, element = source.tag >> 16, source.tag & 0xFFFF
    assert group % 2 == 0, f'{column.name}: private tags are never output'
    listed = actions.get((group, element), set())
    if source.action == columns.KEEP:
      assert not listed, f'{column.name}: PS3.15 says {listed} for {source.keyword}'
    else:
      assert source.action == columns.REPLACE_UID, column.name
      assert any('U' in a.split('_') for a in listed), (
        f'{column.name}: PS3.15 does not replace {source.keyword} with a UID'
      )


def test_the_generators_identifying_fields_are_not_columns():
  actions = _actions()
  keywords = {c.dicom.keyword for c in columns.HEADER_COLUMNS}
  for keyword in sample.IDENTIFYING:
    assert keyword not in keywords
    tag = pydicom.datadict.tag_for_keyword(keyword)
    assert actions.get((tag >> 16, tag & 0xFFFF)), keyword  # the profile lists it


SC = '1.2.840.10008.5.1.4.1.1.7'  # Secondary Capture Image Storage


@pytest.mark.parametrize(
  'burned_in, image_type, sop_class, risky',
  [
    ('YES', None, None, True),
    (' yes ', ['ORIGINAL', 'PRIMARY'], None, True),
    ('NO', ['ORIGINAL', 'PRIMARY'], '1.2.840.10008.5.1.4.1.1.4', False),
    (None, ['DERIVED', 'PRIMARY'], None, True),
    (None, ['ORIGINAL', 'SECONDARY'], None, True),
    (None, ['ORIGINAL', 'SCREEN SAVE'], None, True),
    (None, None, SC, True),
    (None, None, SC + '.4', True),  # multi-frame true colour SC
    (None, None, SC + '7.1', False),  # 1.2.840.10008.5.1.4.1.1.77.1: VL, not SC
    (None, None, None, False),
  ],
)
def test_burned_in_risk_reads_the_three_signs(burned_in, image_type, sop_class, risky):
  reason = flags.burned_in_risk(burned_in, image_type, sop_class)
  assert (reason is not None) == risky


@pytest.mark.parametrize(
  'changes',
  [
    {'BurnedInAnnotation': 'YES'},
    {'BurnedInAnnotation': 'NO'},
    {'ImageType': ['DERIVED', 'SECONDARY', 'OTHER']},
    {'ImageType': 'ORIGINAL'},
    {'SOPClassUID': SC},
  ],
)
def test_both_readers_see_the_same_risk(tmp_path, changes):
  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=1, slices=1, rows=8, columns=8)
  (path,) = glob.glob(os.path.join(root, 'dicoms', '*', '1.dcm'))
  ds = pydicom.dcmread(path)
  for keyword, value in changes.items():
    setattr(ds, keyword, value)
  ds.save_as(path)
  data = open(path, 'rb').read()
  native = _native.decode(data, 1 << 20)
  assert native is not None  # the native reader took it
  assert native.burned_in == decode_dicom(data).burned_in
  expected = (
    'YES' in changes.values()
    or SC in changes.values()
    or ('DERIVED' in changes.get('ImageType', ()))
  )
  assert (native.burned_in is not None) == expected


def test_a_burned_in_slice_is_flagged_or_excluded_with_a_row(tmp_path):
  root = str(tmp_path / 'DATA')
  manifest = sample.make_tree(
    root, patients=2, slices=4, rows=8, columns=8, quirks=['burned_in']
  )
  ((pid, k),) = [key for key, spec in manifest.slices.items() if spec.burned_in]
  flagged = str(tmp_path / 'flagged')
  assert cli.main(['--input', root, '--output', flagged]) == cli.EXIT_OK
  rows = dataset_tables(flagged)['slices']
  risky = [r for r in rows if flags.BURNED_IN in r['qa_flags']]
  assert [(r['patient_id'], r['slice_index']) for r in risky] == [(pid, k)]

  excluded = str(tmp_path / 'excluded')
  args = ['--input', root, '--output', excluded, '--exclude-burned-in']
  assert cli.main(args) == cli.EXIT_DROPPED
  tables = dataset_tables(excluded)
  assert len(tables['slices']) == len(rows) - 1
  assert (pid, k) not in {(r['patient_id'], r['slice_index']) for r in tables['slices']}
  (error,) = tables['errors']
  assert error['stage'] == schema.STAGE_EXCLUDED
  assert error['path'] == f'dicoms/{pid}/{k}.dcm'
  assert 'BurnedInAnnotation is YES' in error['error']
  counters = read_summary(excluded)['counters']
  assert counters[metrics.error_counter(schema.STAGE_EXCLUDED)] == 1
