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


def run_record(
  totals: Mapping[str, int],
  seconds: float,
  drop_duplicates: bool = False,
  **settings,
) -> dict:
  """What a version's commit records of its run (``publish`` adds the run
  id, the files and the report versions, and seals it with a digest).

  Args:
    totals: the run's counters.
    seconds: the pipeline's wall time.
    drop_duplicates: the run's --drop-duplicates (recorded; it decides
      whether duplicate_slice rows stand for dropped inputs).
    settings: recorded as they are (input, labeled_only, strict).
  """
  return {
    'schema_version': schema.SCHEMA_VERSION,
    'beam_version': beam.__version__,
    'drop_duplicates': drop_duplicates,
    **settings,
    'issues': metrics.issue_count(totals),
    'dropped': metrics.dropped_count(totals, drop_duplicates),
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
  """The command that lists a run's problem rows."""
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


def problems_line(issues: int, dropped: int, flagged: int, output: str) -> str:
  """The summary's account of the problem rows, e.g. ``9 problem rows
  (nothing dropped; 18 slices flagged as duplicates); list them with: ...``.

  Args:
    issues: every problem row (metrics.issue_count).
    dropped: those that stand for an input not used (metrics.dropped_count).
    flagged: the slices written with a duplicate flag.
    output: the output root, for the command that lists them.
  """
  parts = [f'{dropped} for dropped inputs' if dropped else 'nothing dropped']
  if flagged:
    parts.append(f'{_plural(flagged, "slice")} flagged as duplicates')
  return (
    f'{_plural(issues, "problem row")} ({"; ".join(parts)}); list them with: '
    f'{problems_command(output)}'
  )


def rate_text(decoded: int, seconds: float, wall_seconds: float | None) -> str:
  """``98.2 slices/s over the pipeline's 11.6 s; 27.9 s in all``: the rate
  over the pipeline's time, then the command's time from its start (listing
  the input before, rewriting and publishing after)."""
  rate = decoded / seconds if seconds else 0
  text = f"{rate:.1f} slices/s over the pipeline's {seconds:.1f} s"
  return text if wall_seconds is None else f'{text}; {wall_seconds:.1f} s in all'


def summary_text(
  counters: Mapping[str, int],
  outputs: Mapping[str, str],
  seconds: float,
  output: str | None = None,
  split: str | None = None,
  patients: Mapping | None = None,
  *,
  wall_seconds: float | None = None,
  drop_duplicates: bool = False,
  flagged: int = 0,
) -> str:
  """The end-of-run summary printed on stdout.

  Args:
    counters: the run's counters.
    outputs: {name: path} of what was written.
    seconds: the pipeline's wall time.
    output: the output root, for the command that lists the problem rows.
    split: the --split fractions, named in the warning about an empty split.
    patients: the record's account of the patients (patients_line).
    wall_seconds: the command's wall time so far, from its start.
    drop_duplicates: the run's --drop-duplicates (metrics.dropped_count).
    flagged: the slices written with a duplicate flag.
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
    f'  ({of_run}{rate_text(decoded, seconds, wall_seconds)})',
    f'  masks written      i: {counters.get(metrics.I_MASKS_WRITTEN, 0)}'
    f'  o: {counters.get(metrics.O_MASKS_WRITTEN, 0)}',
  ]
  issues = [
    (status, counters.get(metrics.reconciliation_counter(status), 0))
    for status in metrics.PROBLEM_STATUSES
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
      f'  warning            split {empty} is empty{at}: fewer patients than '
      'non-zero fractions, its patients pinned elsewhere by an earlier '
      'version, or moved out by duplicate detection (docs/TRAINING.md#splits)'
    )
  issues = metrics.issue_count(counters)
  if issues and output:
    dropped = metrics.dropped_count(counters, drop_duplicates)
    lines.append(
      f'  problems           {problems_line(issues, dropped, flagged, output)}'
    )
  for name, path in outputs.items():
    lines.append(f'  {name:<18} {path}')
  return '\n'.join(lines)
