"""Contour parsing and rasterisation."""

import numpy as np
import pytest

from beam_pipeline.dataset import unpack_mask
from tests.helpers import reference_mask
from transforms.contract.errors import ContourError
from transforms.decode import masks


def test_parse_real_format_with_any_line_ending():
  text = '120.50 137.50\n121.50 137.50\r\n122.00 138.25\r\n\n'
  assert masks.parse_contour(text.encode()) == [
    (120.5, 137.5),
    (121.5, 137.5),
    (122.0, 138.25),
  ]


@pytest.mark.parametrize(
  'text, reason',
  [
    ('1 2\n3 4\n', '2 vertices'),
    ('', '0 vertices'),
    ('1 2\n3 x\n5 6\n', 'not a plain decimal or scientific number'),
    ('1 2\n3 4 5\n5 6\n', 'expected two numbers, x y; got 3 fields'),
    ('1 2\nnan 4\n5 6\n', 'not a plain decimal'),
    ('1 2\n3 inf\n5 6\n', 'not a plain decimal'),
    ('1 2\n3 Infinity\n5 6\n', 'not a plain decimal'),
    ('1 2\n1_30.50 4\n5 6\n', 'not a plain decimal'),  # float() takes it
    ('1 2\n0x1p3 4\n5 6\n', 'not a plain decimal'),
    ('1 2\n3 4e\n5 6\n', 'not a plain decimal'),
    ('1 2\n3 ١٢\n5 6\n', 'ASCII'),  # float() takes Arabic-Indic digits
    ('1 2\n3 1e999\n5 6\n', 'not a finite number'),
  ],
)
def test_parse_rejects(text, reason):
  with pytest.raises(ContourError, match=reason):
    masks.parse_contour(text.encode())


def test_parse_accepts_plain_decimal_and_scientific_notation():
  text = b'120 -3.5\n.5 +7.\n1.2e2 1E-3\n'
  assert masks.parse_contour(text) == [(120.0, -3.5), (0.5, 7.0), (120.0, 0.001)]


def test_parse_rejects_binary():
  with pytest.raises(ContourError, match='ASCII'):
    masks.parse_contour(b'\x89PNG\r\n\x1a\n')


def test_rectangle_fills_its_interior_only():
  # The reference draws the outline with 0 over the fill, so a rectangle
  # with integer corners keeps only its strict interior.
  mask = masks.rasterise([(2, 1), (6, 1), (6, 5), (2, 5)], rows=8, columns=10)
  expected = np.zeros((8, 10), bool)
  expected[2:5, 3:6] = True
  np.testing.assert_array_equal(mask, expected)


def test_x_is_column_and_y_is_row():
  mask = masks.rasterise([(10, 1), (18, 1), (18, 4), (10, 4)], rows=30, columns=20)
  rows, columns = np.nonzero(mask)
  assert set(rows) == {2, 3} and set(columns) == set(range(11, 18))


def test_vertices_outside_the_image_are_clipped():
  mask = masks.rasterise(
    [(-50, -50), (500, -50), (500, 500), (-50, 500)], rows=16, columns=12
  )
  assert mask.shape == (16, 12) and mask.all()


def test_equals_reference_on_random_polygons():
  rng = np.random.default_rng(7)
  for _ in range(200):
    rows, columns = (int(v) for v in rng.integers(8, 80, size=2))
    count = int(rng.integers(3, 30))
    vertices = [
      (float(x), float(y))
      for x, y in zip(
        rng.uniform(-10, columns + 10, count).round(2),
        rng.uniform(-10, rows + 10, count).round(2),
        strict=True,
      )
    ]
    np.testing.assert_array_equal(
      masks.rasterise(vertices, rows, columns), reference_mask(vertices, rows, columns)
    )


@pytest.mark.parametrize('rows, columns', [(1, 1), (3, 5), (7, 9), (256, 256)])
def test_pack_and_unpack_round_trip(rows, columns):
  mask = np.random.default_rng(rows).random((rows, columns)) > 0.5
  packed = masks.pack_mask(mask)
  assert len(packed) == (rows * columns + 7) // 8
  np.testing.assert_array_equal(unpack_mask(packed, rows, columns), mask)
