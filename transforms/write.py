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


class _WriteReport(beam.PTransform):
  """Counts report rows by one field, then writes them to one Parquet file."""

  def __init__(self, output_root, folder, schema, field, counter_names):
    super().__init__()
    self._prefix = _prefix(output_root, folder)
    self._schema = schema
    self._count = _CountFn(field, counter_names)

  def expand(self, rows):
    return (
      rows
      | 'Count' >> beam.ParDo(self._count)
      | 'Write'
      >> beam.io.WriteToParquet(
        self._prefix,
        schema=self._schema,
        codec=CODEC,
        file_name_suffix='.parquet',
        num_shards=1,
      )
    )


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
    reconciliation = outputs['reconciliation'] | 'Reconciliation' >> _WriteReport(
      self._output_root,
      s.RECONCILIATION_DIR,
      s.RECONCILIATION_SCHEMA,
      'status',
      {status: report.reconciliation_counter(status) for status in s.STATUSES},
    )
    errors = outputs['errors'] | 'Errors' >> _WriteReport(
      self._output_root,
      s.ERRORS_DIR,
      s.ERROR_SCHEMA,
      'stage',
      {stage: report.error_counter(stage) for stage in s.STAGES},
    )
    return {
      'slices': slices,
      'reconciliation': reconciliation,
      'errors': errors,
    }
