"""Check a pipeline output end to end: ``python -m beam_pipeline.tools.verify OUT``.

Checks a version (default: the latest; ``--version N``) file by file against
the sizes and digests its run recorded in its commit (and that record
against its own digest), re-reads every shard with page checksums verified,
checks the schema, decodes every image and mask, and checks the counts
against the reconciliation report and the run record. Prints one line per
check and exits 1 on any problem, never with a traceback (2 if OUT is not a
pipeline output).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys

import numpy as np
import pyarrow.parquet as pq
import xxhash

from beam_pipeline import dataset
from beam_pipeline.tools import pipe
from transforms.contract import digests, metrics, schema

_MATCHED_DETAIL = re.compile(r'(\d+) slices')


class _Checks:
  """Collects named pass/fail results."""

  def __init__(self):
    self.failures: list[str] = []
    self.lines: list[str] = []

  def check(self, ok: bool, name: str, detail: str = '') -> None:
    self.lines.append(
      f'{"ok  " if ok else "FAIL"}  {name}' + (f': {detail}' if detail else '')
    )
    if not ok:
      self.failures.append(name)

  @contextlib.contextmanager
  def guard(self, name: str):
    """Any exception inside (a corrupt page, undecodable text) is a FAIL
    line for ``name`` naming it, never a traceback."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - every failure is a finding here
      self.check(False, name, f'{type(e).__name__}: {_one_line(e)}')


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return text if len(text) <= 300 else text[:297] + '...'


def _row_problems(row: dict) -> list[str]:
  """What is wrong with one slice row's image and masks (empty if nothing)."""
  problems = []
  shape = (row['rows'], row['columns']) + (
    (row['samples_per_pixel'],) if row['samples_per_pixel'] > 1 else ()
  )
  try:
    itemsize = np.dtype(row['pixel_dtype']).itemsize
  except TypeError:
    return [f'unknown pixel_dtype {row["pixel_dtype"]!r}']
  if len(row['image']) != int(np.prod(shape)) * itemsize:
    problems.append(
      f'image holds {len(row["image"])} bytes, shape {shape} needs more/less'
    )
  elif xxhash.xxh3_128_hexdigest(row['image']) != row['pixel_xxh3']:
    problems.append('image bytes do not match pixel_xxh3')
  pixels = row['rows'] * row['columns']
  for kind in 'io':
    data = row[f'{kind}_mask']
    if data is None:
      continue
    if len(data) != (pixels + 7) // 8:
      problems.append(f'{kind}_mask holds {len(data)} bytes, not {(pixels + 7) // 8}')
      continue
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    if bits[pixels:].any():
      problems.append(f'{kind}_mask has bits set past rows x columns')
    if int(bits[:pixels].sum()) != row[f'{kind}_mask_pixels']:
      problems.append(f'{kind}_mask does not hold {kind}_mask_pixels pixels')
  return problems


def _parquet_files(output: str, folder: str, summary: dict | None) -> list[str]:
  """The files of one table that a Delta reader reads at the version
  ``summary`` names (whatever the record says: a file added to the log is
  read too); without a readable record, every Parquet file in the folder."""
  if summary is not None:
    try:
      found = dataset.versions.version_files(output, summary)
    except dataset.DatasetError:
      found = set(summary[digests.FILES])
    return [
      os.path.join(output, name)
      for name in sorted(found)
      if name.startswith(folder + '/') and os.path.exists(os.path.join(output, name))
    ]
  path = os.path.join(output, folder)
  return sorted(
    os.path.join(path, n) for n in os.listdir(path) if n.endswith('.parquet')
  )


def _read_report(
  checks: _Checks, output: str, folder: str, arrow_schema, summary: dict | None
) -> list[dict]:
  """A report's rows, each file read on its own; an unreadable file is a FAIL."""
  rows = []
  for path in _parquet_files(output, folder, summary):
    name = f'{folder}/{os.path.basename(path)}'
    with checks.guard(f'{name} readable'):
      table = pq.read_table(path, schema=arrow_schema, page_checksum_verification=True)
      rows += table.to_pylist()
  return rows


def verify(output: str, version: int | None = None) -> _Checks:
  """Runs every check on ``output``; a problem is a FAIL line, never an
  exception.

  Raises:
    FileNotFoundError: ``output`` is not a pipeline output.
  """
  for folder in (schema.SLICES_DIR, schema.RECONCILIATION_DIR, schema.ERRORS_DIR):
    if not os.path.isdir(os.path.join(output, folder)):
      raise FileNotFoundError(
        f'{os.path.join(output, folder)} not found: is {output} a pipeline output?'
      )
  checks = _Checks()
  summary = None
  try:
    summary = dataset.read_summary(output, version)
    checks.check(
      True,
      'run completed',
      f'version {summary["version"]} committed, its run record intact',
    )
  except dataset.DatasetError as e:
    checks.check(False, 'run completed', str(e))
  counters = summary['counters'] if summary else {}
  if summary:
    with checks.guard('files match the summary'):
      problems = dataset.file_problems(output, summary, full=True)
      files = len(summary[digests.FILES])
      checks.check(
        not problems,
        'files match the summary',
        '; '.join(problems[:5]) or f'{files} files, sizes and digests',
      )

  rows = masks_i = masks_o = 0
  keys = collections.Counter()
  per_patient = collections.Counter()
  bad_rows = []
  for path in _parquet_files(output, schema.SLICES_DIR, summary):
    name = f'{schema.SLICES_DIR}/{os.path.basename(path)}'
    with checks.guard(f'{name} readable'):
      shard = pq.ParquetFile(path, page_checksum_verification=True)
      checks.check(
        shard.schema_arrow.equals(schema.SLICE_SCHEMA, check_metadata=False),
        f'schema of {name}',
      )
      for batch in shard.iter_batches(batch_size=256):
        for row in batch.to_pylist():
          rows += 1
          masks_i += row['i_mask'] is not None
          masks_o += row['o_mask'] is not None
          keys[row['patient_id'], row['slice_index']] += 1
          per_patient[row['patient_id']] += 1
          problems = _row_problems(row)
          if problems:
            bad_rows.append(f'{row["patient_id"]}/{row["slice_index"]}: {problems[0]}')
  checks.check(not bad_rows, 'images and masks decode', '; '.join(bad_rows[:5]))
  duplicates = [k for k, n in keys.items() if n > 1]
  checks.check(
    not duplicates,
    'no duplicate (patient_id, slice_index)',
    ', '.join(map(str, duplicates[:5])),
  )

  def against_summary(name, actual, counter):
    if summary:
      expected = counters.get(counter, 0)
      checks.check(actual == expected, name, f'{actual} found, summary says {expected}')

  against_summary('slice rows', rows, metrics.SLICES_WRITTEN)
  against_summary('i masks', masks_i, metrics.I_MASKS_WRITTEN)
  against_summary('o masks', masks_o, metrics.O_MASKS_WRITTEN)

  reconciliation = _read_report(
    checks, output, schema.RECONCILIATION_DIR, schema.RECONCILIATION_SCHEMA, summary
  )
  statuses = collections.Counter(r['status'] for r in reconciliation)
  for status in schema.STATUSES:
    against_summary(
      f'reconciliation {status}',
      statuses[status],
      metrics.reconciliation_counter(status),
    )
  errors = _read_report(checks, output, schema.ERRORS_DIR, schema.ERROR_SCHEMA, summary)
  stages = collections.Counter(r['stage'] for r in errors)
  for stage in schema.STAGES:
    against_summary(f'errors {stage}', stages[stage], metrics.error_counter(stage))

  matched = {
    r['patient_id']: r['detail']
    for r in reconciliation
    if r['status'] == schema.MATCHED
  }
  strays = sorted(set(per_patient) - set(matched), key=str)
  checks.check(
    not strays, 'every written patient is matched', ', '.join(map(str, strays[:5]))
  )
  if summary and not summary.get('labeled_only'):
    unused = collections.Counter(
      r['patient_id']
      for r in errors
      if r['stage'] in (schema.STAGE_DECODE, schema.STAGE_READ)
      and str(r['path']).endswith('.dcm')
    )
    unused.update(summary.get('dropped_duplicates') or {})  # --drop-duplicates
    short = []
    for pid, detail in matched.items():
      listed = _MATCHED_DETAIL.match(str(detail))
      if listed and int(listed.group(1)) != per_patient[pid] + unused[pid]:
        short.append(
          f'{pid}: {listed.group(1)} listed, {per_patient[pid]} written, '
          f'{unused[pid]} in errors'
        )
    checks.check(
      not short,
      'every listed slice is written, in errors or a dropped duplicate',
      '; '.join(short[:5]),
    )
  return checks


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument(
    '--version',
    type=int,
    help='the dataset version to check (default: the latest; see cardiac-mri history)',
  )
  args = parser.parse_args(argv)
  try:
    checks = verify(args.output, args.version)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except Exception as e:  # noqa: BLE001 - a check missed a guard: still one line
    pipe.out(f'FAIL  verify could not finish: {type(e).__name__}: {_one_line(e)}')
    return 1
  pipe.out('\n'.join(checks.lines))
  if checks.failures:
    pipe.out(f'{len(checks.failures)} check(s) failed: {", ".join(checks.failures)}')
    return 1
  pipe.out(f'all {len(checks.lines)} checks passed')
  return 0


if __name__ == '__main__':
  sys.exit(pipe.run(main))
