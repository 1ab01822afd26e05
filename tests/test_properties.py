"""Property-based tests: arbitrary input never raises anything undocumented."""

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.contract import layout
from transforms.contract.errors import ContourError
from transforms.decode import masks

_NUMBERISH = st.one_of(
  st.floats(allow_nan=True, allow_infinity=True).map(repr),
  st.integers().map(str),
  st.text(alphabet=string.digits + '.-+eEnaif ', max_size=12),
)
_CONTOUR_LINES = st.lists(
  st.tuples(_NUMBERISH, _NUMBERISH, st.sampled_from([' ', '\t', '  ', ','])).map(
    lambda t: f'{t[0]}{t[2]}{t[1]}'
  ),
  max_size=30,
)


def _parse_contour_or_contour_error(data):
  try:
    vertices = masks.parse_contour(data)
  except ContourError:
    return None
  assert len(vertices) >= masks.MIN_VERTICES
  assert all(abs(v) <= masks.MAX_COORDINATE for vertex in vertices for v in vertex)
  return vertices


@given(st.binary(max_size=2000))
def test_contour_parser_on_arbitrary_bytes(data):
  _parse_contour_or_contour_error(data)


@given(_CONTOUR_LINES, st.sampled_from(['\n', '\r\n', '\r']))
@settings(max_examples=300)
def test_contour_parser_on_number_like_lines(lines, newline):
  vertices = _parse_contour_or_contour_error(newline.join(lines).encode())
  if vertices is not None:
    mask = masks.rasterise(vertices, 32, 24)
    assert mask.shape == (32, 24)


_CSV_TEXT = st.text(
  alphabet=st.sampled_from(list('ab01.-_,"\r\n /\\\x00\ufeffé')), max_size=300
)


def _check_links(data):
  links, problems = layout.parse_links(data)
  assert all(layout.id_problem(link.patient_id) is None for link in links)
  assert all(layout.id_problem(link.original_id) is None for link in links)
  assert len({link.patient_id for link in links}) == len(links)
  assert len({link.original_id for link in links}) == len(links)
  assert all(p.status in ('malformed_link', 'duplicate_link') for p in problems)
  assert all(p.detail for p in problems)


@given(st.binary(max_size=2000))
def test_link_reader_on_arbitrary_bytes(data):
  _check_links(data)


@given(_CSV_TEXT)
@settings(max_examples=300)
def test_link_reader_on_csv_like_text(text):
  _check_links(('patient_id,original_id\n' + text).encode('utf-8'))


@given(st.text(max_size=200))
def test_path_classifier_on_arbitrary_text(text):
  found = layout.classify_path(text)
  assert isinstance(found, layout.DicomFile | layout.ContourFile | layout.StrayFile)
