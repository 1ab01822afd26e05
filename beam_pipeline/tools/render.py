"""Pictures of slices: the image with its mask outlines drawn over it.

The inner contour is drawn in INNER_COLOUR, the outer in OUTER_COLOUR; the
outline drawn is the mask's own edge (mask pixels with a 4-neighbour outside
the mask), so what you see is exactly what training will see.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from beam_pipeline.dataset import image_of, mask_of

INNER_COLOUR = (255, 40, 40)  # red
OUTER_COLOUR = (0, 200, 255)  # cyan
_BACKGROUND = (16, 16, 16)
_TEXT = (235, 235, 235)
_FLAG_TEXT = (255, 120, 120)
_LEGEND_HEIGHT = 16


def mask_edge(mask: np.ndarray) -> np.ndarray:
  """Mask pixels that touch a non-mask pixel (4-neighbourhood) or the border."""
  padded = np.pad(mask, 1, constant_values=False)
  interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
  return mask & ~interior


def _grey(row: dict) -> np.ndarray:
  """The image as (rows, columns, 3) uint8, windowed to its 1st-99th percentile."""
  image = image_of(row).astype(np.float64)
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  low, high = np.percentile(image, [1, 99])
  if high <= low:
    high = low + 1
  return (np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def overlay(row: dict, scale: int = 1) -> Image.Image:
  """The slice with its mask outlines, scaled up ``scale`` times (nearest)."""
  pixels = _grey(row)
  for kind, colour in (('o', OUTER_COLOUR), ('i', INNER_COLOUR)):
    mask = mask_of(row, kind)
    if mask is not None:
      pixels[mask_edge(mask)] = colour
  picture = Image.fromarray(pixels, 'RGB')
  if scale != 1:
    picture = picture.resize(
      (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
    )
  return picture


def legend(row: dict) -> str:
  """One line: patient, slice, mask areas and flags."""
  areas = []
  for kind, name in (('i', 'inner (red)'), ('o', 'outer (cyan)')):
    mask = mask_of(row, kind)
    areas.append(f'{name} {int(mask.sum()) if mask is not None else "-"} px')
  flags = row.get('qa_flags') or []
  return (
    f'patient {row["patient_id"]}  slice {row["slice_index"]}  '
    + '  '.join(areas)
    + (f'  flags: {", ".join(flags)}' if flags else '')
  )


def with_caption(picture: Image.Image, text: str) -> Image.Image:
  """``picture`` above a strip holding ``text`` (one line per ``\n``)."""
  lines = text.split('\n')
  framed = Image.new(
    'RGB',
    (picture.width, picture.height + _LEGEND_HEIGHT * len(lines)),
    _BACKGROUND,
  )
  framed.paste(picture, (0, 0))
  draw = ImageDraw.Draw(framed)
  for n, line in enumerate(lines):
    top = picture.height + 2 + n * _LEGEND_HEIGHT
    draw.text((3, top), line, fill=_FLAG_TEXT if n else _TEXT)
  return framed


def contact_sheet(rows: list[dict], per_row: int = 6, tile: int = 160) -> Image.Image:
  """A grid of overlays, each captioned with its slice index and its flags."""
  tiles = []
  for row in rows:
    picture = overlay(row)
    picture.thumbnail((tile, tile), Image.Resampling.NEAREST)
    if picture.width < tile // 2:
      factor = max(1, tile // max(picture.width, picture.height))
      picture = picture.resize(
        (picture.width * factor, picture.height * factor), Image.Resampling.NEAREST
      )
    # The tile names its flags, one per line below the slice number.
    flags = list(row.get('qa_flags') or [])
    tiles.append(
      with_caption(picture, '\n'.join([f'slice {row["slice_index"]}', *flags]))
    )
  if not tiles:
    return with_caption(Image.new('RGB', (tile, tile), _BACKGROUND), 'no labeled slice')
  width = max(t.width for t in tiles)
  height = max(t.height for t in tiles)
  columns = min(per_row, len(tiles))
  grid_rows = -(-len(tiles) // columns)
  sheet = Image.new(
    'RGB', (columns * (width + 4) + 4, grid_rows * (height + 4) + 4), _BACKGROUND
  )
  for n, picture in enumerate(tiles):
    r, c = divmod(n, columns)
    sheet.paste(picture, (4 + c * (width + 4), 4 + r * (height + 4)))
  return sheet
