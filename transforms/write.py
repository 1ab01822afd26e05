"""Writing the dataset: slice shards, the reconciliation report, the errors table.

All three go through Beam's Parquet sinks, which write temporary files and
rename them when the write finalises, so a retried bundle leaves no duplicate.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipeline import report
from beam_pipeline import schema as s
from transforms import _files

CODEC = 'zstd'


class _CountFn(beam.DoFn):
  """Counts rows by the value of one field, into one counter per value."""

  def __init__(self, field: str, counter_names: dict[str, str]):
    self._field = field
    self._counter_names = counter_names

  def setup(self):
    self._counters = {
      value: Metrics.counter(report.NAMESPACE, name)
      for value, name in self._counter_names.items()
    }

  def process(self, row: dict):
    self._counters[row[self._field]].inc()
    yield row


def _prefix(output_root: str, folder: str) -> str:
  return _files.join_path(output_root, f'{folder}/part')


class WriteDataset(beam.PTransform):
  """Writes ``{'slices': tables, 'reconciliation': rows, 'errors': rows}``.

  Slices go to ``OUT/slices/part-SSSSS-of-NNNNN.parquet``, one row group per
  Arrow table (one SliceChunk); the two reports to one file each.
  """

  def __init__(self, output_root: str):
    super().__init__()
    self._output_root = output_root

  def expand(self, outputs):
    slices = outputs['slices'] | 'WriteSlices' >> beam.io.WriteToParquetBatched(
      _prefix(self._output_root, s.SLICES_DIR),
      schema=s.SLICE_SCHEMA,
      codec=CODEC,
      file_name_suffix='.parquet',
    )
    reconciliation = (
      outputs['reconciliation']
      | 'CountReconciliation'
      >> beam.ParDo(
        _CountFn(
          'status',
          {status: report.reconciliation_counter(status) for status in s.STATUSES},
        )
      )
      | 'WriteReconciliation'
      >> beam.io.WriteToParquet(
        _prefix(self._output_root, s.RECONCILIATION_DIR),
        schema=s.RECONCILIATION_SCHEMA,
        codec=CODEC,
        file_name_suffix='.parquet',
        num_shards=1,
      )
    )
    errors = (
      outputs['errors']
      | 'CountErrors'
      >> beam.ParDo(
        _CountFn('stage', {stage: report.error_counter(stage) for stage in s.STAGES})
      )
      | 'WriteErrors'
      >> beam.io.WriteToParquet(
        _prefix(self._output_root, s.ERRORS_DIR),
        schema=s.ERROR_SCHEMA,
        codec=CODEC,
        file_name_suffix='.parquet',
        num_shards=1,
      )
    )
    return {
      'slices': slices,
      'reconciliation': reconciliation,
      'errors': errors,
    }
