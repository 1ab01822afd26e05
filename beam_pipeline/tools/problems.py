"""List a run's problem rows: ``python -m beam_pipeline.tools.problems OUT``.

Prints every reconciliation row that is not ``matched`` and every row of the
errors table, one per line (status or stage, ids, path, reason), then a count
by kind. They are the inputs the run did not use and the rows that only
flag or describe written slices (duplicates, a patient without contours):
``transforms.contract.metrics.DROPPED_STATUSES`` says which are which. Exit
0 when there are none, 1 when there are some, 2 when OUT is not a pipeline
output. Needs pyarrow only.
"""

from __future__ import annotations

import argparse
import collections
import sys

from beam_pipeline import dataset
from beam_pipeline.tools import pipe
from transforms.contract import schema


def problem_lines(output: str, version: int | None = None) -> list[str]:
  """One tab-separated line per problem row: table, kind, ids or path, reason.

  Raises:
    FileNotFoundError: ``output`` is not a pipeline output.
  """
  if version is None:
    version = dataset.latest_version(output)
  lines = []
  for row in dataset.read_reconciliation(output, version).to_pylist():
    if row['status'] != schema.MATCHED:
      ids = f'{row["patient_id"] or "-"}/{row["original_id"] or "-"}'
      lines.append(f'reconciliation\t{row["status"]}\t{ids}\t{row["detail"]}')
  for row in dataset.read_errors(output, version).to_pylist():
    lines.append(f'errors\t{row["stage"]}\t{row["path"]}\t{row["error"]}')
  return sorted(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument(
    '--version',
    type=int,
    help='the dataset version to read (default: the latest; see cardiac-mri history)',
  )
  args = parser.parse_args(argv)
  try:
    lines = problem_lines(args.output, args.version)
  except (OSError, dataset.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for line in lines:
    pipe.out(line)
  kinds = collections.Counter(tuple(line.split('\t')[:2]) for line in lines)
  counts = ', '.join(
    f'{kind} ({table}): {n}' for (table, kind), n in sorted(kinds.items())
  )
  pipe.out(f'{len(lines)} problem rows' + (f': {counts}' if counts else ''))
  return 1 if lines else 0


if __name__ == '__main__':
  sys.exit(pipe.run(main))
