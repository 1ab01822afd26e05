"""Contour files to boolean masks: parsing and rasterisation, both pure.

Rasterisation is Pillow's polygon fill, called exactly as the reference that
users of this data know::

    img = PIL.Image.new('L', (columns, rows), 0)
    PIL.ImageDraw.Draw(img).polygon(vertices, outline=0, fill=1)
    mask = numpy.array(img).astype(bool)

Pillow is used rather than a hand-written scan converter because "bit for bit
equal to the reference" then holds by construction, edge pixels included.

Both work within a budget whatever the file: parsing stops past MAX_VERTICES,
and a contour whose fill (MAX_FILL_STEPS, Pillow's steps counted before it
runs) or self-intersection check (MAX_EDGE_PAIRS) would cost more is a
ContourError instead (docs/INPUT.md, "Limits"). Within it, Pillow draws as
before.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw

from transforms.contract.errors import ContourError

MIN_VERTICES = 3
# Far beyond any image; beyond it Pillow's fill slows down (seconds at 1e9) and
# misbehaves (one pixel at 1e12), so such a contour is rejected instead.
MAX_COORDINATE = 1e6

# What one contour may cost (docs/INPUT.md, "Limits"; figures in BENCHMARKS.md,
# bench/hostile.py). A drawn contour has hundreds of vertices; these admit a
# million (a finely sampled ring) and refuse what would take minutes.
# Parsing stops past MAX_VERTICES, so a file's size costs nothing beyond it.
MAX_VERTICES = 1_000_000
# Pillow's scanline fill, counted as it works (see fill_steps): on every image
# row the polygon spans it tests every edge and sorts the crossings, an edge
# that starts on a row is compared with every edge before it, and the outline
# is drawn pixel by pixel, inside the image or not. Between 1 and 5 ns a step.
MAX_FILL_STEPS = 200_000_000
# The self-intersection check (GEOS, quality.is_self_intersecting) compares
# the edges whose extents overlap (see edge_pairs): nearly all of them, on a
# ring folded on itself. About 25 ns a pair.
MAX_EDGE_PAIRS = 20_000_000


# What a coordinate may look like: 120, -3.5, .5, 120.50, 1.2e2, 1E-3. Not
# Python's other float spellings (1_30.5, nan, inf, infinity, 0x1p3).
_NUMBER = re.compile(r'[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?')
_NOT_ASCII = re.compile(rb'[\x80-\xff]')
# What str.splitlines() splits ASCII text at (\r\n is one break), and the
# other characters str.split() takes for white space.
_BREAKS = b'\n\r\x0b\x0c\x1c\x1d\x1e'
_BLANKS = b' \t\x1f'
# A line's text from its first character that is not white space to its end.
_CONTENT = re.compile(b'[^%s%s][^%s]*' % (_BLANKS, _BREAKS, _BREAKS))
# Below this, str.splitlines() (faster); above it, lines are found one at a
# time, so a huge file costs no list of its lines (parsing stops at
# MAX_VERTICES) and a flood of blank lines is skipped in C.
_SPLIT_BYTES = 1 << 20


def _lines(data: bytes) -> Iterator[tuple[int, str]]:
  """(line number, text) of the lines of ASCII ``data`` that hold anything
  but white space, numbered as ``enumerate(text.splitlines(), 1)`` numbers
  them; the text may lack the line's leading white space."""
  if len(data) <= _SPLIT_BYTES:
    yield from enumerate(data.decode('ascii').splitlines(), start=1)
    return
  breaks = end = 0
  for match in _CONTENT.finditer(data):
    start = match.start()
    if end and start == end + 1:  # one break since the last line: the usual
      breaks += 1
    elif start > end:  # white space and breaks only
      gap = data[end:start]
      breaks += len(gap.translate(None, _BLANKS)) - gap.count(b'\r\n')
    end = match.end()
    yield breaks + 1, match.group().decode('ascii')


def parse_contour(data: bytes) -> list[tuple[float, float]]:
  """Parses a contour file: one ``x y`` vertex per line, in pixel coordinates.

  x is the column, y the row. Blank lines and any line ending (LF, CRLF, CR)
  are accepted.

  Args:
    data: the raw bytes of the file.

  Returns:
    The vertices in file order.

  Raises:
    ContourError: a line is not two finite numbers, there are fewer than
      three vertices or more than MAX_VERTICES (the file is not read past
      the vertex after the last allowed).
  """
  if not data.isascii():
    first = _NOT_ASCII.search(data).start()
    raise ContourError(f'not an ASCII text file (byte {first})')
  vertices = []
  for number, line in _lines(data):
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
    if len(vertices) == MAX_VERTICES:
      raise ContourError(
        f'line {number}: more than {MAX_VERTICES:,} vertices, the most a contour '
        'may have; not read further'
      )
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


def _fill_bound(vertices: int, width: int, height: int, columns: int) -> int:
  """An upper bound of :func:`fill_steps` for ``vertices`` within ``width``
  x ``height`` pixels, ``height`` at most the rows scanned."""
  return (
    vertices * (max(width, height) + 1)  # the outline
    + vertices * (min(width, columns) + 1)  # horizontal edges
    + vertices * height * (1 + math.ceil(math.log2(2 * vertices + 2)))
    + vertices * vertices  # corners
    + height * columns  # the spans filled
  )


def fill_steps(points: np.ndarray, rows: int, columns: int) -> int:
  """The steps Pillow's polygon fill takes for ``points`` (an (n, 2) array
  of vertices) in a (rows, columns) image, counted as it works (Pillow 12,
  libImaging/Draw.c, on the vertices truncated to integers): the outline's
  pixels, inside the image or not; each horizontal edge's span; on each row
  scanned, a test of every other edge and a sort of its crossings; for each
  edge that starts (or, on the last row, ends) on a scanned row, a pass over
  the edges before it; and the spans filled. About 1 to 5 ns a step
  (BENCHMARKS.md, "Hostile inputs")."""
  points = np.trunc(points).astype(np.int64)
  x0, y0 = points[:, 0], points[:, 1]
  x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
  outline = int(np.maximum(np.abs(x1 - x0), np.abs(y1 - y0)).sum()) + len(points)
  if x0[-1] == x0[0] and y0[-1] == y0[0]:  # closed by its last vertex
    x0, y0, x1, y1 = x0[:-1], y0[:-1], x1[:-1], y1[:-1]
  flat = y0 == y1
  left, right = np.minimum(x0[flat], x1[flat]), np.maximum(x0[flat], x1[flat])
  inside = (y0[flat] >= 0) & (y0[flat] < rows)
  spans = np.minimum(right, columns - 1) - np.maximum(left, 0) + 1
  steps = outline + int(np.clip(spans[inside], 0, None).sum()) + len(left)
  low = max(min(rows - 1, int(y0.min())), 0)
  high = min(max(0, int(y0.max())), rows)
  if high < low:
    return steps
  scanned = high - low + 1
  x0, y0, x1, y1 = x0[~flat], y0[~flat], x1[~flat], y1[~flat]
  bottom, top = np.minimum(y0, y1), np.maximum(y0, y1)
  rows_crossed = np.minimum(top, high) - np.maximum(bottom, low) + 1
  crossings = int(np.clip(rows_crossed, 0, None).sum())
  sloped = x0 != x1
  index = np.arange(len(y0))
  corners = index[sloped & (bottom >= low) & (bottom <= high)].sum()
  corners += index[sloped & (top == high)].sum()
  sort = crossings * math.ceil(math.log2(2 * len(y0) + 2))
  return steps + len(y0) * scanned + int(corners) + sort + scanned * columns


def edge_pairs(points: np.ndarray) -> int:
  """An upper bound of the pairs of edges the self-intersection check
  compares for ``points`` (an (n, 2) array of vertices): of the closed
  ring's edges, the pairs whose x ranges overlap, or whose y ranges do,
  whichever are fewer (GEOS compares only edges whose bounding boxes meet)."""
  ends = np.roll(points, -1, axis=0)
  n = len(points)
  pairs = n * (n - 1) // 2
  for axis in (0, 1):
    low = np.minimum(points[:, axis], ends[:, axis])
    high = np.sort(np.maximum(points[:, axis], ends[:, axis]))
    apart = int(np.searchsorted(high, low, side='left').sum())  # wholly below
    pairs = min(pairs, n * (n - 1) // 2 - apart)
  return pairs


def _points(vertices: list[tuple[float, float]]) -> np.ndarray:
  """The vertices as an (n, 2) array (twice as fast as ``np.asarray``)."""
  flat = itertools.chain.from_iterable(vertices)
  return np.fromiter(flat, np.float64, 2 * len(vertices)).reshape(-1, 2)


def check_cost(vertices: list[tuple[float, float]], rows: int, columns: int) -> None:
  """Refuses a contour that would cost more than its limits to fill into a
  (rows, columns) image (MAX_FILL_STEPS) or to check for self-intersection
  (MAX_EDGE_PAIRS). A drawn contour is cleared from its vertex count, or
  from its extent, without counting the steps.

  Raises:
    ContourError: saying which limit, and by how much.
  """
  n = len(vertices)
  reach = 2 * int(MAX_COORDINATE) + 2  # the widest a contour can be
  points = None
  if _fill_bound(n, reach, rows + 2, columns) > MAX_FILL_STEPS:
    points = _points(vertices)
    xs, ys = points[:, 0], points[:, 1]
    width = math.floor(xs.max()) - math.floor(xs.min()) + 2
    height = math.floor(ys.max()) - math.floor(ys.min()) + 2
    extent = _fill_bound(n, width, min(height, rows + 2), columns)
    if (
      extent > MAX_FILL_STEPS
      and (steps := fill_steps(points, rows, columns)) > MAX_FILL_STEPS
    ):
      raise ContourError(
        f'filling its {n:,} vertices into a {rows} x {columns} image would take '
        f'about {steps:,} steps, more than the {MAX_FILL_STEPS:,} a contour may '
        'take (its edges cross many rows, or each other, or reach far outside '
        'the image)'
      )
  if n * (n - 1) // 2 > MAX_EDGE_PAIRS:
    points = _points(vertices) if points is None else points
    if (pairs := edge_pairs(points)) > MAX_EDGE_PAIRS:
      raise ContourError(
        f'checking its {n:,} vertices for self-intersection would compare about '
        f'{pairs:,} pairs of edges, more than the {MAX_EDGE_PAIRS:,} a contour '
        'may take (its edges overlap one another)'
      )


def rasterise(
  vertices: list[tuple[float, float]], rows: int, columns: int
) -> np.ndarray:
  """Fills a polygon into a (rows, columns) boolean mask, as the reference does.

  Vertices outside the image are clipped, as in the reference.

  Raises:
    ContourError: the contour costs more than its limits (:func:`check_cost`).
  """
  check_cost(vertices, rows, columns)
  image = Image.new('L', (columns, rows), 0)
  ImageDraw.Draw(image).polygon(vertices, outline=0, fill=1)
  return np.asarray(image).astype(bool)


def pack_mask(mask: np.ndarray) -> bytes:
  """The stored form of a mask: ``numpy.packbits`` of the row-major booleans."""
  return np.packbits(mask, axis=None).tobytes()
