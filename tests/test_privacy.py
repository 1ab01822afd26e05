"""What leaves the pipeline: the header columns against DICOM PS3.15.

The Basic Application Level Confidentiality Profile (PS3.15 Annex E, Table
E.1-1) lists what must be removed (X), emptied (Z), replaced with a dummy
(D) or replaced with a UID (U); an attribute it does not list is kept. The
table comes from the pinned dicom-anonymizer package (its 2026c edition of
the standard), so it is data, not a list written here.
"""

import pydicom
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as ps315

from beam_pipeline.contract import columns


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
  from beam_pipeline import sample

  actions = _actions()
  keywords = {c.dicom.keyword for c in columns.HEADER_COLUMNS}
  for keyword in sample.IDENTIFYING:
    assert keyword not in keywords
    tag = pydicom.datadict.tag_for_keyword(keyword)
    assert actions.get((tag >> 16, tag & 0xFFFF)), keyword  # the profile lists it
