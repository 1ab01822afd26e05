"""Progress lines, the summary and the exit-code rule."""

import logging

from apache_beam.portability.api import beam_fn_api_pb2

from beam_pipeline import console, summary
from beam_pipeline.contract import metrics
from beam_pipeline.contract import schema as s
from transforms import _progress


def test_progress_logs_at_most_once_per_interval(caplog):
  caplog.set_level(logging.INFO, logger='transforms.progress')
  progress = _progress.Progress(interval=3600)
  for _ in range(50):
    progress.add(patients=1, slices=10)
  assert caplog.messages == []
  progress = _progress.Progress(interval=0)
  progress.add(patients=1, slices=10)
  progress.add(patients=1, slices=5)
  assert caplog.messages[-1].startswith('progress: 2 patients done, 15 slices written')
  assert 'slices/s' in caplog.messages[-1]


def test_summary_lists_issues_by_status_and_errors_by_stage():
  counters = {
    metrics.reconciliation_counter(s.MATCHED): 3,
    metrics.reconciliation_counter(s.MISSING_DICOMS): 2,
    metrics.error_counter(s.STAGE_DECODE): 1,
    metrics.SLICES_WRITTEN: 40,
    metrics.I_MASKS_WRITTEN: 7,
  }
  text = summary.summary_text(counters, {'slices': '/out/slices'}, seconds=4.0)
  assert 'patients matched   3' in text
  assert 'slices written     40  (10.0 slices/s' in text
  assert 'i: 7  o: 0' in text
  assert 'missing_dicoms: 2' in text and 'decode: 1' in text
  assert '/out/slices' in text
  assert metrics.issue_count(counters) == 3


def test_a_clean_run_has_no_issues():
  counters = {metrics.reconciliation_counter(s.MATCHED): 3, metrics.SLICES_WRITTEN: 9}
  assert metrics.issue_count(counters) == 0
  assert 'no issues' in summary.summary_text(counters, {}, 1.0)


def _relayed(message: str, location: str, level: int) -> logging.LogRecord:
  """A worker's log line as Beam's job service relays it to the driver."""
  entry = beam_fn_api_pb2.LogEntry(message=message, log_location=location)
  return logging.LogRecord(
    console.WORKER_LOGGER, level, 'x.py', 1, 'Worker: %s', (str(entry),), None
  )


def test_worker_lines_of_ours_are_shown_plainly_and_beams_chatter_dropped():
  keep = console.WorkerLogFilter()
  ours = _relayed('progress: "1" patient', '/x/beam_pipeline/metrics.py:70', 20)
  assert keep.filter(ours) and ours.getMessage() == 'progress: "1" patient'
  assert ours.name == 'worker'
  warning = _relayed('dicoms/P/1.dcm: odd', '/x/transforms/decode.py:9', 30)
  assert keep.filter(warning) and warning.getMessage() == 'dicoms/P/1.dcm: odd'
  chatter = _relayed('Discarding unparseable args', '/x/apache_beam/a.py:3', 30)
  assert not keep.filter(chatter)
  assert keep.filter(_relayed('worker crashed', '/x/apache_beam/a.py:3', 40))
  other = logging.LogRecord(console.WORKER_LOGGER, 20, 'x', 1, 'Grpc up', (), None)
  assert not keep.filter(other)


def test_summary_shows_each_split_and_warns_of_an_empty_one():
  counters = {
    metrics.split_patients_counter('train'): 4,
    metrics.split_slices_counter('train'): 920,
    metrics.split_patients_counter('test'): 1,
    metrics.split_slices_counter('test'): 1,
    metrics.reconciliation_counter(s.MISSING_DICOMS): 2,
  }
  text = summary.summary_text(counters, {}, 1.0, output='/o u t', split='0.8,0.1,0.1')
  assert (
    'splits             train: 4 patients, 920 slices; val: 0 patients, 0 slices; '
    'test: 1 patient, 1 slice'
  ) in text
  assert 'split val is empty: no patient hashed into it at --split 0.8,0.1,0.1' in text
  assert 'split test is empty' not in text
  assert (
    "2 problem rows; list them with: python -m beam_pipeline.problems '/o u t'" in text
  )
  assert summary.empty_splits({}) == []  # nothing written: no split to blame
