"""link.csv parsing, id validation and path classification."""

import pytest

from transforms.contract import layout
from transforms.contract.layout import ContourFile, DicomFile, Link, StrayFile


def _statuses(problems):
  return [(p.patient_id, p.original_id, p.status) for p in problems]


def test_plain_links():
  links, problems = layout.parse_links(
    b'patient_id,original_id\nSCD0000101,SC-HF-I-1\nSCD0000201,SC-HF-I-2\n'
  )
  assert links == [
    Link('SCD0000101', 'SC-HF-I-1', 2),
    Link('SCD0000201', 'SC-HF-I-2', 3),
  ]
  assert problems == []


def test_bom_crlf_spaces_blank_lines_quotes_and_extra_columns():
  data = (
    '\ufeff patient_id , original_id ,note\r\n'
    '\r\n'
    ' SCD0000101 ,"SC-HF-I-1", first \r\n'
    '"SCD0000201","SC-HF-I-2","a, quoted note"\r\n'
  ).encode('utf-8')
  links, problems = layout.parse_links(data)
  assert links == [
    Link('SCD0000101', 'SC-HF-I-1', 3),
    Link('SCD0000201', 'SC-HF-I-2', 4),
  ]
  assert problems == []


def test_columns_are_found_by_name():
  links, _ = layout.parse_links(b'original_id,patient_id\nSC-HF-I-1,SCD01\n')
  assert links == [Link('SCD01', 'SC-HF-I-1', 2)]


def test_duplicates_keep_the_first_row():
  links, problems = layout.parse_links(
    b'patient_id,original_id\nA1,O1\nA1,O2\nB1,O1\nA1,O1\n'
  )
  assert links == [Link('A1', 'O1', 2)]
  assert _statuses(problems) == [
    ('A1', 'O2', 'duplicate_link'),
    ('B1', 'O1', 'duplicate_link'),
    ('A1', 'O1', 'duplicate_link'),
  ]
  assert 'line 3' in problems[0].detail and 'line 2' in problems[0].detail


@pytest.mark.parametrize(
  'bad_id', ['../x', '/etc', 'a/b', 'a\\b', '.hidden', 'nul\0byte', 'sp ace', '..']
)
def test_ids_that_could_form_paths_are_malformed(bad_id):
  data = f'patient_id,original_id\n"{bad_id}",O1\nP2,O2\n'.encode()
  links, problems = layout.parse_links(data)
  assert links == [Link('P2', 'O2', 3)]
  assert _statuses(problems) == [(bad_id, 'O1', 'malformed_link')]


def test_short_row_and_empty_id_are_malformed():
  links, problems = layout.parse_links(b'patient_id,original_id\nP1\n,O2\nP3,O3\n')
  assert links == [Link('P3', 'O3', 4)]
  assert [p.status for p in problems] == ['malformed_link'] * 2
  assert 'expected 2 fields' in problems[0].detail
  assert 'is empty' in problems[1].detail


def test_wrong_header_reads_no_row():
  links, problems = layout.parse_links(b'pid,oid\nP1,O1\n')
  assert links == []
  assert [p.status for p in problems] == ['malformed_link']
  assert 'header' in problems[0].detail


@pytest.mark.parametrize('data', [b'', b'\n\n', b'\xef\xbb\xbf'])
def test_empty_file_is_reported(data):
  links, problems = layout.parse_links(data)
  assert links == []
  assert [p.status for p in problems] == ['malformed_link']


def test_non_utf8_bytes_make_a_malformed_row_not_a_crash():
  links, problems = layout.parse_links(b'patient_id,original_id\nP\xff1,O1\nP2,O2\n')
  assert links == [Link('P2', 'O2', 3)]
  assert [p.status for p in problems] == ['malformed_link']


@pytest.mark.parametrize(
  'path, expected',
  [
    ('dicoms/SCD01/48.dcm', DicomFile('SCD01', 48, 'dicoms/SCD01/48.dcm')),
    ('dicoms/SCD01/1.dcm', DicomFile('SCD01', 1, 'dicoms/SCD01/1.dcm')),
    (
      'contourfiles/SC-1/i-contours/IM-0001-0048-icontour-manual.txt',
      ContourFile(
        'SC-1', 'i', 48, 'contourfiles/SC-1/i-contours/IM-0001-0048-icontour-manual.txt'
      ),
    ),
    (
      'contourfiles/SC-1/o-contours/IM-0001-0120-ocontour-manual.txt',
      ContourFile(
        'SC-1',
        'o',
        120,
        'contourfiles/SC-1/o-contours/IM-0001-0120-ocontour-manual.txt',
      ),
    ),
  ],
)
def test_classify_layout_files(path, expected):
  assert layout.classify_path(path) == expected


@pytest.mark.parametrize(
  'path',
  [
    'dicoms/SCD01/.DS_Store',
    'dicoms/SCD01/048.dcm',
    'dicoms/SCD01/0.dcm',
    'dicoms/SCD01/1.DCM',
    'dicoms/SCD01/sub/1.dcm',
    'dicoms/1.dcm',
    'contourfiles/SC-1/i-contours/.IM-0001-0048-icontour-manual.txt.swp',
    'contourfiles/SC-1/i-contours/IM-0001-0048-ocontour-manual.txt',
    'contourfiles/SC-1/i-contours/IM-0001-48-icontour-manual.txt',
    'contourfiles/SC-1/x-contours/IM-0001-0048-icontour-manual.txt',
    'contourfiles/SC-1/IM-0001-0048-icontour-manual.txt',
  ],
)
def test_classify_stray_files(path):
  found = layout.classify_path(path)
  assert isinstance(found, StrayFile)
  assert found.path == path and found.reason


def test_contour_name_round_trips_through_classify():
  name = layout.contour_name('o', 7)
  assert name == 'IM-0001-0007-ocontour-manual.txt'
  assert layout.classify_path(f'contourfiles/X/o-contours/{name}').slice_index == 7
