"""Progress lines, the summary and the exit-code rule."""

import logging
import os

from apache_beam.portability.api import beam_fn_api_pb2

from beam_pipeline.launch import console, progress, summary
from transforms import _worker_progress
from transforms.contract import counts, metrics, schema


def test_progress_logs_at_most_once_per_interval(caplog):
  caplog.set_level(logging.INFO, logger='transforms.progress')
  progress = _worker_progress.Progress(interval=3600)
  for _ in range(50):
    progress.add(patients=1, slices=10)
  assert caplog.messages == []
  progress = _worker_progress.Progress(interval=0)
  progress.add(patients=1, slices=10)
  progress.add(patients=1, slices=5)
  assert caplog.messages[-1].startswith('progress: 2 patients done, 15 slices done')
  assert 'slices/s' in caplog.messages[-1]


def test_summary_lists_issues_by_status_and_errors_by_stage():
  counters = {
    metrics.reconciliation_counter(schema.MATCHED): 3,
    metrics.reconciliation_counter(schema.MISSING_DICOMS): 2,
    metrics.error_counter(schema.STAGE_DECODE): 1,
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
  counters = {
    metrics.reconciliation_counter(schema.MATCHED): 3,
    metrics.SLICES_WRITTEN: 9,
  }
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
    metrics.reconciliation_counter(schema.MISSING_DICOMS): 2,
  }
  text = summary.summary_text(counters, {}, 1.0, output='/o u t', split='0.8,0.1,0.1')
  assert (
    'splits             train: 4 patients, 920 slices; val: 0 patients, 0 slices; '
    'test: 1 patient, 1 slice'
  ) in text
  assert 'split val is empty: no patient hashed into it at --split 0.8,0.1,0.1' in text
  assert 'split test is empty' not in text
  assert (
    "2 problem rows; list them with: python -m beam_pipeline.tools.problems '/o u t'"
    in text
  )
  assert summary.empty_splits({}) == []  # nothing written: no split to blame


def test_a_progress_line_has_the_total_the_rate_and_the_eta():
  assert progress.line(1080, 1140, 2112.4, 4) == (
    'progress: 1,080/1,140 slices (95%), 2,112 slices/s, ETA 0:00, 4 patients done'
  )
  assert progress.line(10, 1000, 2.0, 0).split(', ')[2] == 'ETA 8:15'
  assert progress.line(10, None, 2.0, 1) == (
    'progress: 10 slices, 2 slices/s, 1 patients done'
  )
  unknown_rate = progress.line(10, 20, None, 1)
  assert unknown_rate == 'progress: 10/20 slices (50%), 1 patients done'
  assert progress.eta_text(3 * 3600 + 2 * 60 + 10) == '3:02:10'


def test_the_launcher_sums_the_count_files_of_every_worker_process(tmp_path, caplog):
  """Two processes' count files (and files that are not one, skipped) sum
  into the launcher's line; the folder is gone afterwards."""
  caplog.set_level(logging.INFO, logger='beam_pipeline.launch.progress')
  with progress.Reporter(total=30, interval=3600, live=False) as reporter:
    folder = reporter.folder
    with open(os.path.join(folder, '101.count'), 'wb') as f:
      f.write(counts.record(12, 1))
    with open(os.path.join(folder, '102.count'), 'wb') as f:
      f.write(counts.record(18, 2))
    with open(os.path.join(folder, '103.count.tmp'), 'wb') as f:
      f.write(counts.record(99, 9))
    with open(os.path.join(folder, '104.count'), 'wb') as f:
      f.write(b'')  # created, not yet written
  assert caplog.messages[-1] == 'progress: 30/30 slices (100%), 3 patients done'
  assert not os.path.exists(folder)


def test_a_count_caught_mid_write_keeps_its_last_record(tmp_path):
  path = tmp_path / '7.count'
  last = {}
  path.write_bytes(counts.record(199, 3))
  assert counts.read_counts(str(tmp_path), last) == (199, 3)
  old, new = counts.record(199, 3), counts.record(200, 4)
  for cut in range(1, len(new)):  # every torn mix of the new and old record
    torn = new[:cut] + old[cut:]
    path.write_bytes(torn)
    want = (200, 4) if torn == new else (199, 3)
    assert counts.read_counts(str(tmp_path), last) == want, cut
  path.write_bytes(new)
  assert counts.read_counts(str(tmp_path), last) == (200, 4)
  assert counts.read_counts(str(tmp_path / 'gone')) == (0, 0)


def test_a_worker_writes_its_counts_where_the_launcher_reads_them(tmp_path):
  worker = _worker_progress.Progress(interval=3600, folder=str(tmp_path))
  worker.add(patients=1, slices=7)
  worker.add(slices=5)
  worker.flush()
  assert counts.read_counts(str(tmp_path)) == (12, 1)
