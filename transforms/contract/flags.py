"""The quality flags a slice can raise: name and when it is raised.

Declared once: the decode stage checks them (``transforms.decode.quality``), the
counters are named after them, the QA page explains them, and a test holds
docs/OUTPUT.md's table to this one.
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
  'burned_in_annotation_risk': 'the pixels may show text, such as a name: '
  'BurnedInAnnotation is YES, ImageType holds SECONDARY, DERIVED or SCREEN '
  'SAVE, or the SOP class is a secondary capture (--exclude-burned-in drops '
  'the slice)',
}
BURNED_IN = 'burned_in_annotation_risk'

# What says a slice's pixels may hold burned-in text (PS3.15 Annex E: the
# Basic Profile does not clean pixels). The pixels are not searched for text.
_RISKY_IMAGE_TYPES = ('SECONDARY', 'DERIVED', 'SCREEN SAVE')
SECONDARY_CAPTURE_ROOT = '1.2.840.10008.5.1.4.1.1.7'  # and its .1 to .4


def burned_in_risk(
  burned_in_annotation: str | None,
  image_type: list[str] | None,
  sop_class_uid: str | None,
) -> str | None:
  """Why a slice's pixels may show burned-in text, or None (the values of
  BurnedInAnnotation, ImageType and SOPClassUID, None when absent)."""
  if (burned_in_annotation or '').strip().upper() == 'YES':
    return 'BurnedInAnnotation is YES'
  risky = [v for v in (image_type or ()) if v.strip().upper() in _RISKY_IMAGE_TYPES]
  if risky:
    return f'ImageType holds {risky[0].strip().upper()}'
  uid = (sop_class_uid or '').strip()
  if uid == SECONDARY_CAPTURE_ROOT or uid.startswith(SECONDARY_CAPTURE_ROOT + '.'):
    return f'the SOP class {uid} is a secondary capture'
  return None
