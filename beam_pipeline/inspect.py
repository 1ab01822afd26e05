"""Draw one slice with its contours: ``python -m beam_pipeline.inspect OUT
--patient ID --slice N -o slice.png``.

The inner contour is red, the outer cyan; a legend line below the image names
the patient, the slice, the mask areas and any quality flags.
"""

from __future__ import annotations

import argparse
import sys

import pyarrow.compute as pc

from beam_pipeline import dataset, render


def find_slice(output: str, patient_id: str, slice_index: int) -> dict | None:
  """The row of one slice, or None if the output holds no such slice."""
  table = dataset.open_dataset(output).to_table(
    filter=(pc.field('patient_id') == patient_id)
    & (pc.field('slice_index') == slice_index)
  )
  return table.slice(0, 1).to_pylist()[0] if table.num_rows else None


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument('--patient', required=True, help='patient_id')
  parser.add_argument('--slice', required=True, type=int, help='slice_index')
  parser.add_argument('-o', '--out', required=True, help='PNG file to write')
  parser.add_argument('--scale', type=int, default=3, help='zoom (default 3)')
  args = parser.parse_args(argv)
  try:
    row = find_slice(args.output, args.patient, args.slice)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if row is None:
    print(
      f'error: no slice {args.slice} of patient {args.patient!r} in {args.output}',
      file=sys.stderr,
    )
    return 2
  picture = render.with_caption(render.overlay(row, args.scale), render.legend(row))
  picture.save(args.out)
  print(f'{args.out}: {render.legend(row)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
