"""Progress lines, the summary and the exit-code rule."""

import logging
import os
import re
import shutil
import time

import pytest
from apache_beam.portability.api import beam_fn_api_pb2

from beam_pipeline.dataset import versions
from beam_pipeline.launch import cli, console, progress, summary
from beam_pipeline.tools import sample
from transforms import _worker_progress
from transforms.contract import counts, digests, layout, metrics, schema


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
  assert 'split val is empty at --split 0.8,0.1,0.1: fewer patients than' in text
  assert 'split test is empty' not in text
  assert (
    'problems           2 problem rows (2 for dropped inputs); list them with: '
    "python -m beam_pipeline.tools.problems '/o u t'"
  ) in text
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


def test_only_the_rows_of_unused_inputs_count_as_dropped():
  """Every error row and the rows of inputs not used count; a patient
  without contours and flagged duplicates do not, unless --drop-duplicates
  dropped the copies."""
  assert set(metrics.PROBLEM_STATUSES) == set(schema.STATUSES) - {schema.MATCHED}
  kept = set(metrics.PROBLEM_STATUSES) - set(metrics.DROPPED_STATUSES)
  assert kept == {
    schema.MISSING_CONTOURS,
    schema.DUPLICATE_SLICE,
    schema.DUPLICATE_CONTOUR,
  }
  flags_only = {
    metrics.reconciliation_counter(schema.MATCHED): 5,
    metrics.reconciliation_counter(schema.MISSING_CONTOURS): 1,
    metrics.reconciliation_counter(schema.DUPLICATE_SLICE): 2,
    metrics.reconciliation_counter(schema.DUPLICATE_CONTOUR): 6,
  }
  assert metrics.issue_count(flags_only) == 9
  assert metrics.dropped_count(flags_only) == 0
  assert metrics.dropped_count(flags_only, drop_duplicates=True) == 2
  for stage in schema.STAGES:
    with_error = {**flags_only, metrics.error_counter(stage): 1}
    assert metrics.dropped_count(with_error) == 1, stage
  for status in metrics.DROPPED_STATUSES:
    assert metrics.dropped_count({metrics.reconciliation_counter(status): 3}) == 3


def test_the_summary_says_whether_anything_was_dropped_and_how_long_it_all_took():
  counters = {
    metrics.SLICES_WRITTEN: 1140,
    metrics.reconciliation_counter(schema.DUPLICATE_CONTOUR): 9,
  }
  text = summary.summary_text(
    counters, {}, 11.6, output='/o', wall_seconds=27.94, flagged=18
  )
  assert (
    "slices written     1140  (98.3 slices/s over the pipeline's 11.6 s; "
    '27.9 s in all)\n'
  ) in text
  assert (
    '  problems           9 problem rows (nothing dropped; 18 slices flagged as '
    'duplicates); list them with: python -m beam_pipeline.tools.problems /o'
  ) in text.splitlines()
  counters[metrics.error_counter(schema.STAGE_READ)] = 2
  text = summary.summary_text(counters, {}, 11.6, output='/o', flagged=18)
  assert '11 problem rows (2 for dropped inputs; 18 slices flagged as duplicates)' in (
    text
  )
  assert "over the pipeline's 11.6 s)" in text  # no wall time given, none shown


def _copies_tree(tmp_path):
  """3 patients of 6 slices: the first patient's slice 2 copied as the
  second's slice 7 (a duplicate_slice row), and the first's slice 3 inner
  contour copied over the second's (a duplicate_contour row)."""
  root = str(tmp_path / 'DATA')
  manifest = sample.make_tree(root, patients=3, slices=6, rows=16, columns=16)
  (p, o), (q, r) = manifest.links[:2]
  dicoms = os.path.join(root, layout.DICOM_DIR)
  shutil.copy(os.path.join(dicoms, p, '2.dcm'), os.path.join(dicoms, q, '7.dcm'))
  contours = os.path.join(root, layout.CONTOUR_DIR)
  name = layout.contour_name('i', 3)
  shutil.copy(
    os.path.join(contours, o, 'i-contours', name),
    os.path.join(contours, r, 'i-contours', name),
  )
  return root, q


def _main(*args) -> tuple[int, float]:
  """cli.main(args): (exit code, seconds it took)."""
  began = time.monotonic()
  code = cli.main(list(args))
  return code, time.monotonic() - began


def _problems_line(printed: str) -> str:
  (line,) = [x for x in printed.splitlines() if x.startswith('  problems ')]
  return line


def test_a_run_that_only_flags_exits_zero_and_strict_still_fails_it(tmp_path, capsys):
  """Copies flagged, nothing dropped: exit 0 and a summary that says so,
  with the command's time beside the pipeline's and a line for each step
  after the last progress line; --strict fails the same run (exit 4)."""
  root, _ = _copies_tree(tmp_path)
  out = str(tmp_path / 'OUT')
  code, took = _main('--input', root, '--output', out)
  assert code == cli.EXIT_OK
  printed = capsys.readouterr()
  command = summary.problems_command(out)
  assert _problems_line(printed.out) == (
    '  problems           2 problem rows (nothing dropped; 4 slices flagged as '
    f'duplicates); list them with: {command}'
  )
  record = versions.record(out)
  assert (record['issues'], record['dropped']) == (2, 0)
  rate = re.search(
    r"slices written     19  \(([\d.]+) slices/s over the pipeline's ([\d.]+) s; "
    r'([\d.]+) s in all\)',
    printed.out,
  )
  assert rate, printed.out
  pipeline, in_all = float(rate[2]), float(rate[3])
  assert pipeline == pytest.approx(record['seconds'], abs=0.05)
  assert pipeline <= in_all <= took + 0.05  # both rounded to 0.1 s
  assert float(rate[1]) == pytest.approx(19 / record['seconds'], rel=0.01)
  # what runs after the last progress line says so as it starts
  lines = printed.err.splitlines()
  at = {
    key: next(i for i, x in enumerate(lines) if key in x)
    for key in ('progress: 19/19 slices (100%)', 'applying the duplicate', 'publishing')
  }
  assert list(at.values()) == sorted(at.values()), lines
  shards = [f for f in record[digests.FILES] if f.startswith(schema.SLICES_DIR + '/')]
  applying = re.search(
    r'applying the duplicate plan \(4 slices flagged, 0 dropped, (\d) patients? '
    r'moved\): rewriting (\d+) of (\d+) staged slice files$',
    lines[at['applying the duplicate']],
  )
  assert applying, lines[at['applying the duplicate']]
  assert 1 <= int(applying[2]) <= int(applying[3]) == len(shards)
  assert lines[at['publishing']].endswith(
    f'publishing version 0 ({len(record[digests.FILES])} new files) to {out}'
  )

  code, _ = _main('--input', root, '--output', out, '--strict')
  assert code == cli.EXIT_STRICT
  printed = capsys.readouterr()
  assert '2 problem rows (nothing dropped; 4 slices flagged' in printed.out
  assert 'carrying over the unchanged patients of version 0' in printed.err
  assert 'publishing version 1 (' in printed.err
  assert versions.record(out)['version'] == 1


def test_dropped_inputs_exit_three(tmp_path, capsys):
  """An unused contour folder exits 3 (a patient without contours beside
  it drops nothing); so do the copies --drop-duplicates leaves out."""
  root = str(tmp_path / 'DATA')
  sample.make_tree(
    root,
    patients=2,
    slices=3,
    rows=8,
    columns=8,
    quirks=['unlinked_contours', 'missing_contours'],
  )
  out = str(tmp_path / 'OUT')
  assert _main('--input', root, '--output', out)[0] == cli.EXIT_DROPPED
  assert _problems_line(capsys.readouterr().out).startswith(
    '  problems           2 problem rows (1 for dropped inputs); list them with: '
  )
  record = versions.record(out)
  assert (record['issues'], record['dropped']) == (2, 1)

  copies, q = _copies_tree(tmp_path / 'copies')
  out = str(tmp_path / 'DROPPED')
  code, _ = _main('--input', copies, '--output', out, '--drop-duplicates')
  assert code == cli.EXIT_DROPPED
  assert _problems_line(capsys.readouterr().out).startswith(
    '  problems           2 problem rows (1 for dropped inputs; 3 slices flagged '
    'as duplicates)'
  )
  record = versions.record(out)
  assert (record['issues'], record['dropped']) == (2, 1)
  assert record['dropped_duplicates'] == {q: 1}
