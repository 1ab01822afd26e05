"""The quality flags a slice can raise: name and when it is raised.

Declared once: the decode stage checks them (``transforms.quality``), the
counters are named after them, the QA page explains them, and a test holds
the README's table to this one.
"""

from __future__ import annotations

FLAGS: dict[str, str] = {
  'i_area_mismatch': 'inner mask pixels differ from the polygon area by more '
  'than the perimeter + 10 % of the area',
  'i_empty_mask': 'the inner polygon fills no pixel',
  'i_self_intersecting': 'two edges of the inner polygon cross',
  'i_vertices_outside': 'an inner vertex lies outside the image (clipped)',
  'o_area_mismatch': 'outer mask pixels differ from the polygon area by more '
  'than the perimeter + 10 % of the area',
  'o_empty_mask': 'the outer polygon fills no pixel',
  'o_self_intersecting': 'two edges of the outer polygon cross',
  'o_vertices_outside': 'an outer vertex lies outside the image (clipped)',
  'inner_outside_outer': 'less than 99 % of the inner mask lies inside the outer mask',
  'constant_image': 'every pixel has the same value',
  'pixels_out_of_range': 'a value does not fit bits_stored with the sign of '
  'pixel_representation',
  'duplicate_slice': 'the same image (SOP Instance UID or identical pixels) is '
  'also written as another slice (see the duplicate_slice reconciliation row)',
  'duplicate_contour': 'a contour file of this slice is byte-identical to '
  "another slice's (see the duplicate_contour reconciliation row)",
}
