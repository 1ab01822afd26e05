"""Draw one slice with its contours to a PNG:
``cardiac-mri inspect OUT --patient ID --slice N [-o slice.png]``.

``--patient`` takes a patient_id or an original_id (the contour folder's
name). The inner contour is red, the outer cyan; a legend line below the
image names the patient, the slice, the mask areas and any quality flags. An
unknown id lists the valid ones; a missing slice lists the patient's slices.
"""

from __future__ import annotations

import argparse
import sys

import pyarrow.compute as pc

from beam_pipeline import dataset
from beam_pipeline.tools import pipe, render

_LISTED = 20  # ids shown when the one asked for is unknown


def find_slice(
  output: str, patient: str, slice_index: int, version: int | None = None
) -> dict | None:
  """The row of one slice of ``patient`` (a patient_id or an original_id),
  or None if the output holds no such slice."""
  table = dataset.open_dataset(output, version).to_table(
    filter=((pc.field('patient_id') == patient) | (pc.field('original_id') == patient))
    & (pc.field('slice_index') == slice_index)
  )
  return table.slice(0, 1).to_pylist()[0] if table.num_rows else None


def _ranges(numbers: list[int]) -> str:
  """``1-24, 30, 32-33``."""
  parts, start = [], None
  for n, following in zip(numbers, [*numbers[1:], None], strict=True):
    start = n if start is None else start
    if following != n + 1:
      parts.append(f'{start}-{n}' if n != start else f'{n}')
      start = None
  return ', '.join(parts)


def why_missing(
  output: str, patient: str, slice_index: int, version: int | None = None
) -> str:
  """One line saying why there is no such slice, with the valid choices."""
  table = dataset.open_dataset(output, version).to_table(
    columns=['patient_id', 'original_id', 'slice_index']
  )
  mine = table.filter(
    (pc.field('patient_id') == patient) | (pc.field('original_id') == patient)
  )
  if mine.num_rows:
    slices = sorted(set(mine['slice_index'].to_pylist()))
    return (
      f'patient {patient!r} has no slice {slice_index} in {output}; its slices: '
      f'{_ranges(slices)}'
    )
  ids = table['patient_id'].to_pylist(), table['original_id'].to_pylist()
  pairs = sorted(set(zip(*ids, strict=True)))
  listed = ', '.join(f'{p} ({o})' for p, o in pairs[:_LISTED])
  unlisted = f' and {len(pairs) - _LISTED} more' if len(pairs) > _LISTED else ''
  return (
    f'no patient {patient!r} in {output}; patient_id (original_id): '
    f'{listed or "none"}{unlisted}'
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0].replace('\n', ' ')
  )
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument('--patient', required=True, help='patient_id or original_id')
  parser.add_argument('--slice', required=True, type=int, help='slice_index')
  parser.add_argument(
    '-o', '--out', help='PNG file to write (default: <patient_id>-<slice>.png)'
  )
  parser.add_argument('--scale', type=int, default=3, help='zoom (default 3)')
  parser.add_argument(
    '--version',
    type=int,
    help='the dataset version to read (default: the latest; see cardiac-mri history)',
  )
  args = parser.parse_args(argv)
  try:
    row = find_slice(args.output, args.patient, args.slice, args.version)
    if row is None:
      why = why_missing(args.output, args.patient, args.slice, args.version)
      print(f'error: {why}', file=sys.stderr)
      return 2
    out = args.out or f'{row["patient_id"]}-{row["slice_index"]}.png'
    picture = render.with_caption(render.overlay(row, args.scale), render.legend(row))
    picture.save(out)
  except (OSError, dataset.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  pipe.out(f'{out}: {render.legend(row)}')
  return 0


if __name__ == '__main__':
  sys.exit(pipe.run(main))
