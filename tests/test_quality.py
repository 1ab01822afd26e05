"""Quality checks and split assignment (pure functions)."""

import time

import numpy as np
import pytest
import xxhash

from tests.helpers import reference_mask
from transforms.contract import splits
from transforms.contract.errors import UsageError
from transforms.decode import quality

SQUARE = [(10.0, 10.0), (30.0, 10.0), (30.0, 30.0), (10.0, 30.0)]
BOWTIE = [(10.0, 10.0), (30.0, 30.0), (30.0, 10.0), (10.0, 30.0)]


def _checks(kind, vertices, rows=40, columns=40):
  mask = reference_mask(vertices, rows, columns)
  return quality.contour_checks(kind, vertices, mask)


def test_shoelace_area():
  assert quality.polygon_area(np.array(SQUARE)) == 400.0
  assert quality.polygon_area(np.array([(0, 0), (4, 0), (0, 3)], float)) == 6.0
  # Orientation does not matter.
  assert quality.polygon_area(np.array(SQUARE[::-1])) == 400.0


def test_a_clean_square_raises_no_flag():
  columns, flags = _checks('i', SQUARE)
  assert flags == []
  assert columns == {
    'i_vertex_count': 4,
    'i_polygon_area': 400.0,
    'i_mask_pixels': 19 * 19,  # the interior: the boundary is left out
    'i_vertices_outside': 0,
    'i_self_intersecting': False,
  }


def test_bowtie_is_self_intersecting_and_its_area_disagrees():
  columns, flags = _checks('o', BOWTIE)
  assert columns['o_self_intersecting'] is True
  assert 'o_self_intersecting' in flags and 'o_area_mismatch' in flags


def test_vertices_outside_and_empty_masks_are_flagged():
  columns, flags = _checks('i', [(-5.0, 2.0), (20.0, 2.0), (20.0, 50.0)])
  assert columns['i_vertices_outside'] == 2 and 'i_vertices_outside' in flags
  columns, flags = _checks('o', [(100.0, 100.0), (120.0, 100.0), (120.0, 120.0)])
  assert columns['o_mask_pixels'] == 0 and 'o_empty_mask' in flags


def test_degenerate_polygon_does_not_raise():
  # The reference fills one pixel for a polygon of zero area.
  columns, flags = _checks('i', [(5.0, 5.0)] * 3)
  assert columns['i_polygon_area'] == 0.0
  assert 'i_area_mismatch' in flags


def test_a_million_vertices_is_fast_enough():
  angles = np.linspace(0, 2 * np.pi, 1_000_000, endpoint=False)
  circle = np.column_stack([200 + 150 * np.cos(angles), 200 + 150 * np.sin(angles)])
  start = time.perf_counter()
  assert not quality.is_self_intersecting(circle)
  assert time.perf_counter() - start < 30  # O(n^2) would take hours


def test_nesting():
  inner = reference_mask([(15.0, 15.0), (25.0, 15.0), (25.0, 25.0)], 40, 40)
  outer = reference_mask(SQUARE, 40, 40)
  assert quality.nesting_check(inner, outer) == (1.0, [])
  shifted = np.roll(inner, 12, axis=1)
  fraction, flags = quality.nesting_check(shifted, outer)
  assert fraction < 0.99 and flags == ['inner_outside_outer']
  assert quality.nesting_check(np.zeros_like(inner), outer) == (None, [])


def test_pixel_checks():
  image = np.arange(12, dtype=np.uint16).reshape(3, 4)
  columns, flags = quality.pixel_checks(image, bits_stored=12, pixel_representation=0)
  assert flags == [] and (columns['pixel_min'], columns['pixel_max']) == (0.0, 11.0)
  assert columns['pixel_xxh3'] == xxhash.xxh3_128_hexdigest(image.tobytes())
  assert len(columns['pixel_xxh3']) == 32
  other, _ = quality.pixel_checks(image + 1, 12, 0)
  assert other['pixel_xxh3'] != columns['pixel_xxh3']
  _, flags = quality.pixel_checks(np.full((3, 3), 5000, np.uint16), 12, 0)
  assert flags == ['constant_image', 'pixels_out_of_range']
  signed = np.array([[-2048, 2047]], np.int16)
  assert quality.pixel_checks(signed, 12, 1)[1] == []
  assert quality.pixel_checks(signed - 1, 12, 1)[1] == ['pixels_out_of_range']


@pytest.mark.parametrize('text', ['0.8,0.1', '0.8,0.1,0.2', 'a,b,c', '1.2,-0.1,-0.1'])
def test_bad_split_fractions_are_usage_errors(text):
  with pytest.raises(UsageError, match='--split'):
    splits.parse_fractions(text)


def test_split_is_stable_and_follows_the_fractions():
  fractions = splits.parse_fractions('0.7,0.2,0.1')
  ids = [f'SCD{n:07d}' for n in range(20_000)]
  first = [splits.assign_split(pid, fractions) for pid in ids]
  assert first == [splits.assign_split(pid, fractions) for pid in ids]
  for name, expected in zip(splits.SPLITS, fractions, strict=True):
    assert abs(first.count(name) / len(ids) - expected) < 0.015
  assert {splits.assign_split(pid, (1.0, 0.0, 0.0)) for pid in ids[:500]} == {'train'}
  assert {splits.assign_split(pid, (0.0, 0.0, 1.0)) for pid in ids[:500]} == {'test'}
