"""List a dataset's versions: ``cardiac-mri history OUT [--json]``.

One line per version, oldest first: when it was committed, the run that made
it, its input, the options that shape the rows, its row counts, what changed
against the version before (patients added, removed, changed and kept, by a
digest of each patient's rows; row counts; slice files; input and options),
and whether its files are still there (``vacuum`` removes those of old
versions). Exit 0, or 2 when OUT holds no version. Needs pyarrow only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import xxhash

from beam_pipeline.dataset import versions
from beam_pipeline.tools import pipe
from transforms.contract import digests, metrics, schema

# The recorded settings that shape the rows (shown when they change).
_OPTIONS = ('labeled_only', 'strict', 'drop_duplicates', 'pseudonymized')


def _rows(record: dict) -> dict[str, int]:
  counters = record.get('counters', {})
  return {
    'slices': counters.get(metrics.SLICES_WRITTEN, 0),
    'reconciliation': sum(
      counters.get(metrics.reconciliation_counter(s), 0) for s in schema.STATUSES
    ),
    'errors': sum(counters.get(metrics.error_counter(s), 0) for s in schema.STAGES),
  }


def _readable(output: str, record: dict) -> bool:
  return all(os.path.exists(os.path.join(output, f)) for f in record[digests.FILES])


# The columns a patient's rows are compared by between versions.
_COMPARED = ('patient_id', 'slice_index', 'split', 'pixel_xxh3', 'i_mask', 'o_mask')


def patient_digests(output: str, record: dict) -> dict[str, str] | None:
  """{patient_id: a digest of its rows} in a version (None when its files
  are gone): what tells a changed patient from a kept one."""
  import pyarrow.parquet as pq

  shards = [f for f in record[digests.FILES] if f.startswith(schema.SLICES_DIR + '/')]
  rows: dict[str, list] = {}
  for name in shards:
    path = os.path.join(output, name)
    try:
      table = pq.read_table(path, columns=list(_COMPARED))
    except (OSError, ValueError):  # gone, or unreadable: verify says which
      return None
    for row in zip(*(table.column(c).to_pylist() for c in _COMPARED), strict=True):
      rows.setdefault(row[0], []).append(repr(row[1:]))
  return {
    pid: xxhash.xxh3_128_hexdigest('\n'.join(sorted(found)).encode())
    for pid, found in rows.items()
  }


def _patients_changed(now: dict | None, then: dict | None) -> str | None:
  """``patients +added -removed ~changed =kept``, or None if unknown."""
  if now is None or then is None:
    return None
  added = len(set(now) - set(then))
  removed = len(set(then) - set(now))
  common = set(now) & set(then)
  changed = sum(now[p] != then[p] for p in common)
  return f'patients +{added} -{removed} ~{changed} ={len(common) - changed}'


def _change(
  record: dict,
  before: dict | None,
  patients: str | None = None,
) -> str:
  """What a version changed against the one before it."""
  if before is None:
    return 'first version'
  parts = [patients] if patients else []
  rows, old = _rows(record), _rows(before)
  for name in ('slices', 'errors'):
    if rows[name] != old[name]:
      parts.append(f'{name} {old[name]} -> {rows[name]}')
  files = {f for f in record[digests.FILES] if f.startswith(schema.SLICES_DIR)}
  kept = files & set(before[digests.FILES])
  parts.append(f'{len(files) - len(kept)} slice file(s) new, {len(kept)} kept')
  if record.get('input') != before.get('input'):
    parts.append('input changed')
  changed = [o for o in _OPTIONS if record.get(o) != before.get(o)]
  if changed:
    parts.append('options changed: ' + ', '.join(changed))
  return '; '.join(parts)


def _committed(when) -> str | None:
  """A commit's time (ms since the epoch, written by deltalake) in ISO 8601
  UTC; None when it is not a time."""
  if not isinstance(when, int | float) or isinstance(when, bool):
    return None
  try:
    moment = datetime.datetime.fromtimestamp(when / 1000, datetime.UTC)
  except (OverflowError, OSError, ValueError):
    return None
  return moment.isoformat(timespec='seconds')


def entries(output: str) -> list[dict]:
  """Every version as ``history`` shows it (what --json prints).

  Raises:
    DatasetError: ``output`` holds no version.
  """
  found = []
  before = None
  previous = None
  records = versions.history(output)
  if not records:
    versions.latest(output)  # raises, naming why
  for record in records:
    entry = {
      'version': record[versions.VERSION],
      'committed': _committed(record.get('timestamp')),
    }
    if 'error' in record:
      found.append({**entry, 'error': record['error']})
      continue
    current = patient_digests(output, record)
    entry.update(
      run_id=record.get('run_id'),
      input=record.get('input'),
      options={o: record.get(o) for o in _OPTIONS},
      rows=_rows(record),
      change=_change(record, before, _patients_changed(current, previous)),
      readable=_readable(output, record),
    )
    found.append(entry)
    before, previous = record, current
  return found


def _line(entry: dict) -> str:
  if 'error' in entry:
    return f'{entry["version"]:>7}  {entry["committed"]}  {entry["error"]}'
  rows = entry['rows']
  state = '' if entry['readable'] else '  (files vacuumed)'
  return (
    f'{entry["version"]:>7}  {entry["committed"]}  {entry["run_id"]}  '
    f'{rows["slices"]:>7} {rows["reconciliation"]:>6} {rows["errors"]:>6}  '
    f'{entry["change"]}{state}'
  )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument('--json', action='store_true', help='one JSON list instead')
  args = parser.parse_args(argv)
  try:
    found = entries(args.output)
  except (OSError, versions.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if args.json:
    pipe.out(json.dumps(found, indent=2))
    return 0
  pipe.out(
    f'{"version":>7}  {"committed (UTC)":<25}  {"run id":<24}  '
    f'{"slices":>7} {"recon":>6} {"errors":>6}  change'
  )
  for entry in found:
    pipe.out(_line(entry))
  inputs = sorted({e['input'] for e in found if e.get('input')})
  for source in inputs:
    pipe.out(f'input: {source}')
  return 0


if __name__ == '__main__':
  sys.exit(pipe.run(main))
