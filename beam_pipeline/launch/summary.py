"""The end of a run: counters read back, the run record and the summary text."""

from __future__ import annotations

import shlex
from collections.abc import Mapping

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineResult

from transforms.contract import metrics, schema, splits


def counters(result: PipelineResult) -> dict[str, int]:
  """The project's counters, summed over steps (committed where available)."""
  totals: dict[str, int] = {}
  query = result.metrics().query(MetricsFilter().with_namespace(metrics.NAMESPACE))
  for counter in query['counters']:
    value = counter.committed if counter.committed is not None else counter.attempted
    name = counter.key.metric.name
    totals[name] = totals.get(name, 0) + (value or 0)
  return totals


def run_record(totals: Mapping[str, int], seconds: float, **settings) -> dict:
  """What a version's commit records of its run (``publish`` adds the run
  id, the files and the report versions, and seals it with a digest).

  Args:
    totals: the run's counters.
    seconds: the run's wall time.
    settings: recorded as they are (input, labeled_only, strict).
  """
  return {
    'schema_version': schema.SCHEMA_VERSION,
    'beam_version': beam.__version__,
    **settings,
    'issues': metrics.issue_count(totals),
    'seconds': round(seconds, 3),
    'counters': dict(sorted(totals.items())),
  }


def _plural(n: int, word: str) -> str:
  return f'{n} {word}' if n == 1 else f'{n} {word}s'


def split_line(counters: Mapping[str, int]) -> str:
  """Patients and slices per split, e.g. ``train: 4 patients, 920 slices; ...``."""
  parts = []
  for split in splits.SPLITS:
    patients = counters.get(metrics.split_patients_counter(split), 0)
    slices = counters.get(metrics.split_slices_counter(split), 0)
    parts.append(f'{split}: {_plural(patients, "patient")}, {_plural(slices, "slice")}')
  return '; '.join(parts)


def empty_splits(counters: Mapping[str, int]) -> list[str]:
  """The splits that got no slice (while some other split got slices)."""
  written = {s: counters.get(metrics.split_slices_counter(s), 0) for s in splits.SPLITS}
  if not any(written.values()):
    return []
  return [split for split, n in written.items() if n == 0]


def problems_command(output: str) -> str:
  """The command that lists a run's quarantined inputs."""
  return f'python -m beam_pipeline.tools.problems {shlex.quote(output)}'


def history_command(output: str) -> str:
  """The command that lists an output's versions."""
  return f'cardiac-mri history {shlex.quote(output)}'


def patients_line(patients: Mapping) -> str:
  """What a run did to the patients of the version it started from, e.g.
  ``1 added, 0 replaced, 0 removed, 99 kept (from version 3)``."""
  counts = ', '.join(
    f'{patients[k]} {k}' for k in ('added', 'replaced', 'removed', 'kept')
  )
  if patients['from_version'] is None:
    return f'{counts} (the first version)'
  if patients['why_full']:
    return f'{counts} (all decoded: {patients["why_full"]})'
  return f'{counts} (from version {patients["from_version"]})'


def summary_text(
  counters: Mapping[str, int],
  outputs: Mapping[str, str],
  seconds: float,
  output: str | None = None,
  split: str | None = None,
  patients: Mapping | None = None,
) -> str:
  """The end-of-run summary printed on stdout.

  Args:
    counters: the run's counters.
    outputs: {name: path} of what was written.
    seconds: the run's wall time.
    output: the output root, for the command that lists quarantined inputs.
    split: the --split fractions, named in the warning about an empty split.
    patients: the record's account of the patients (patients_line).
  """
  slices = counters.get(metrics.SLICES_WRITTEN, 0)
  decoded = slices if not patients else patients.get('slices_decoded', slices)
  of_run = f'{decoded} of them this run, ' if decoded != slices else ''
  lines = [
    'Summary',
    '  patients matched   '
    f'{counters.get(metrics.reconciliation_counter(schema.MATCHED), 0)}'
    + (f'  ({patients_line(patients)})' if patients else ''),
    f'  slices written     {slices}'
    f'  ({of_run}{decoded / seconds if seconds else 0:.1f} slices/s over '
    f'{seconds:.1f} s)',
    f'  masks written      i: {counters.get(metrics.I_MASKS_WRITTEN, 0)}'
    f'  o: {counters.get(metrics.O_MASKS_WRITTEN, 0)}',
  ]
  issues = [
    (status, counters.get(metrics.reconciliation_counter(status), 0))
    for status in schema.STATUSES
    if status != schema.MATCHED
  ]
  lines.append(
    '  reconciliation     '
    + (', '.join(f'{status}: {n}' for status, n in issues if n) or 'no issues')
  )
  errors = [
    (stage, counters.get(metrics.error_counter(stage), 0)) for stage in schema.STAGES
  ]
  lines.append(
    '  errors             '
    + (', '.join(f'{stage}: {n}' for stage, n in errors if n) or 'none')
  )
  flags = metrics.qa_flag_counts(counters)
  lines.append(
    '  quality flags      '
    + (', '.join(f'{flag}: {n}' for flag, n in flags.items()) or 'none')
  )
  lines.append(f'  splits             {split_line(counters)}')
  for empty in empty_splits(counters):
    at = f' at --split {split}' if split else ''
    lines.append(
      f'  warning            split {empty} is empty: no patient hashed into it'
      f'{at}; more patients or other fractions fill it'
    )
  issues = metrics.issue_count(counters)
  if issues and output:
    lines.append(
      f'  quarantined        {_plural(issues, "problem row")}; list them with: '
      f'{problems_command(output)}'
    )
  for name, path in outputs.items():
    lines.append(f'  {name:<18} {path}')
  return '\n'.join(lines)
