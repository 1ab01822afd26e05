"""The end of a run: counters read back, ``_SUMMARY.json`` and the summary text."""

from __future__ import annotations

import json
from collections.abc import Mapping

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineResult

from beam_pipeline.contract import metrics
from beam_pipeline.contract import schema as s


def counters(result: PipelineResult) -> dict[str, int]:
  """The project's counters, summed over steps (committed where available)."""
  totals: dict[str, int] = {}
  query = result.metrics().query(MetricsFilter().with_namespace(metrics.NAMESPACE))
  for counter in query['counters']:
    value = counter.committed if counter.committed is not None else counter.attempted
    name = counter.key.metric.name
    totals[name] = totals.get(name, 0) + (value or 0)
  return totals


def write_summary(
  output: str,
  totals: Mapping[str, int],
  seconds: float,
  **settings,
) -> str:
  """Writes ``OUT/_SUMMARY.json`` (last: it marks the dataset complete).

  Args:
    output: the output root.
    totals: the run's counters.
    seconds: the run's wall time.
    settings: recorded as they are (input, labeled_only, strict).

  Returns:
    The summary's path.
  """
  path = FileSystems.join(output, s.SUMMARY_FILE)
  summary = {
    'schema_version': s.SCHEMA_VERSION,
    'beam_version': beam.__version__,
    **settings,
    'issues': metrics.issue_count(totals),
    'seconds': round(seconds, 3),
    'counters': dict(sorted(totals.items())),
  }
  with FileSystems.create(path) as f:
    f.write(json.dumps(summary, indent=2).encode() + b'\n')
  return path


def summary_text(
  counters: Mapping[str, int], outputs: Mapping[str, str], seconds: float
) -> str:
  """The end-of-run summary printed on stdout."""
  slices = counters.get(metrics.SLICES_WRITTEN, 0)
  lines = [
    'Summary',
    '  patients matched   '
    f'{counters.get(metrics.reconciliation_counter(s.MATCHED), 0)}',
    f'  slices written     {slices}'
    f'  ({slices / seconds if seconds else 0:.1f} slices/s over {seconds:.1f} s)',
    f'  masks written      i: {counters.get(metrics.I_MASKS_WRITTEN, 0)}'
    f'  o: {counters.get(metrics.O_MASKS_WRITTEN, 0)}',
  ]
  issues = [
    (status, counters.get(metrics.reconciliation_counter(status), 0))
    for status in s.STATUSES
    if status != s.MATCHED
  ]
  lines.append(
    '  reconciliation     '
    + (', '.join(f'{status}: {n}' for status, n in issues if n) or 'no issues')
  )
  errors = [
    (stage, counters.get(metrics.error_counter(stage), 0)) for stage in s.STAGES
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
  for name, path in outputs.items():
    lines.append(f'  {name:<18} {path}')
  return '\n'.join(lines)
