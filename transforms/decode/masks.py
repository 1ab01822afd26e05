"""Contour files to boolean masks: parsing and rasterisation, both pure.

Rasterisation is Pillow's polygon fill, called exactly as the reference that
users of this data know::

    img = PIL.Image.new('L', (columns, rows), 0)
    PIL.ImageDraw.Draw(img).polygon(vertices, outline=0, fill=1)
    mask = numpy.array(img).astype(bool)

Pillow is used rather than a hand-written scan converter because "bit for bit
equal to the reference" then holds by construction, edge pixels included.
"""

from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image, ImageDraw

from transforms.contract.errors import ContourError

MIN_VERTICES = 3
# Far beyond any image; beyond it Pillow's fill slows down (seconds at 1e9) and
# misbehaves (one pixel at 1e12), so such a contour is rejected instead.
MAX_COORDINATE = 1e6


# What a coordinate may look like: 120, -3.5, .5, 120.50, 1.2e2, 1E-3. Not
# Python's other float spellings (1_30.5, nan, inf, infinity, 0x1p3).
_NUMBER = re.compile(r'[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?')


def parse_contour(data: bytes) -> list[tuple[float, float]]:
  """Parses a contour file: one ``x y`` vertex per line, in pixel coordinates.

  x is the column, y the row. Blank lines and any line ending (LF, CRLF, CR)
  are accepted.

  Args:
    data: the raw bytes of the file.

  Returns:
    The vertices in file order.

  Raises:
    ContourError: a line is not two finite numbers, or there are fewer than
      three vertices.
  """
  try:
    text = data.decode('ascii')
  except UnicodeDecodeError as e:
    raise ContourError(f'not an ASCII text file (byte {e.start})') from e
  vertices = []
  for number, line in enumerate(text.splitlines(), start=1):
    fields = line.split()
    if not fields:
      continue
    # The line itself is never quoted: a header line such as "Patient <id>
    # DOE^JOHN" would carry an identifier into the error rows.
    if len(fields) != 2:
      raise ContourError(
        f'line {number}: expected two numbers, x y; got {_shape(line, len(fields))}'
      )
    if not (_NUMBER.fullmatch(fields[0]) and _NUMBER.fullmatch(fields[1])):
      raise ContourError(
        f'line {number}: not a plain decimal or scientific number '
        f'({_shape(line, len(fields))})'
      )
    x, y = float(fields[0]), float(fields[1])
    if not (math.isfinite(x) and math.isfinite(y)):  # 1e999 overflows
      raise ContourError(f'line {number}: not a finite number')
    if abs(x) > MAX_COORDINATE or abs(y) > MAX_COORDINATE:
      raise ContourError(f'line {number}: coordinate beyond +-{MAX_COORDINATE:g}')
    vertices.append((x, y))
  if len(vertices) < MIN_VERTICES:
    raise ContourError(
      f'{len(vertices)} vertices; a polygon needs at least {MIN_VERTICES}'
    )
  return vertices


def _shape(line: str, fields: int) -> str:
  """What a bad line looks like, without its text: its fields and length."""
  length = len(line.strip())
  return f'{fields} field{"s" * (fields != 1)} of {length} characters in all'


def rasterise(
  vertices: list[tuple[float, float]], rows: int, columns: int
) -> np.ndarray:
  """Fills a polygon into a (rows, columns) boolean mask, as the reference does.

  Vertices outside the image are clipped, as in the reference.
  """
  image = Image.new('L', (columns, rows), 0)
  ImageDraw.Draw(image).polygon(vertices, outline=0, fill=1)
  return np.asarray(image).astype(bool)


def pack_mask(mask: np.ndarray) -> bytes:
  """The stored form of a mask: ``numpy.packbits`` of the row-major booleans."""
  return np.packbits(mask, axis=None).tobytes()
