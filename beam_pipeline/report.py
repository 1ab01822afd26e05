"""Counters, progress lines and the end-of-run summary.

All counters live in one Beam metrics namespace, NAMESPACE. Workers log a
progress line at most every PROGRESS_SECONDS; the driver reads the counters
back when the run ends and prints the summary.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping

from apache_beam.portability.api import beam_fn_api_pb2
from google.protobuf import text_format

from beam_pipeline import schema as s

NAMESPACE = 'cardiac_mri'
PROGRESS_SECONDS = 5.0

# Counter names. Per-status and per-stage counters are built from the
# constants in beam_pipeline.schema.
PATIENTS_DONE = 'patients_done'
SLICES_WRITTEN = 'slices_written'
I_MASKS_WRITTEN = 'i_masks_written'
O_MASKS_WRITTEN = 'o_masks_written'
SLICE_BYTES_READ = 'dicom_bytes_read'


def reconciliation_counter(status: str) -> str:
  return f'reconciliation_{status}'


def error_counter(stage: str) -> str:
  return f'errors_{stage}'


def qa_counter(flag: str) -> str:
  return f'qa_{flag}'


_LOG = logging.getLogger('beam_pipeline.progress')


class Progress:
  """Logs patients done, slices written and slices/s, at most every few seconds.

  One instance per worker process (see :func:`progress`), shared by every DoFn
  instance and thread in it.
  """

  def __init__(self, interval: float = PROGRESS_SECONDS):
    self._interval = interval
    self._lock = threading.Lock()
    self._start = None
    self._last_log = 0.0
    self._patients = 0
    self._slices = 0

  def add(self, patients: int = 0, slices: int = 0) -> None:
    now = time.monotonic()
    with self._lock:
      if self._start is None:
        self._start = self._last_log = now
      self._patients += patients
      self._slices += slices
      if now - self._last_log < self._interval:
        return
      self._last_log = now
      elapsed = now - self._start
      patients, slices = self._patients, self._slices
    _LOG.info(
      'progress: %d patients done, %d slices written, %.1f slices/s (process %d)',
      patients,
      slices,
      slices / elapsed if elapsed else 0.0,
      os.getpid(),
    )


_progress: dict[str, Progress] = {}
_progress_lock = threading.Lock()


def progress(run_id: str, interval: float = PROGRESS_SECONDS) -> Progress:
  """This process's Progress for the run ``run_id`` (one per run and process)."""
  with _progress_lock:
    if run_id not in _progress:
      _progress.clear()  # a process serves one run at a time
      _progress[run_id] = Progress(interval)
    return _progress[run_id]


# The driver-side logger through which Beam's local job service relays the
# log lines of worker processes (DirectRunner multi_processing, portable).
WORKER_LOGGER = 'apache_beam.runners.portability.local_job_service'
_OUR_PACKAGES = ('/beam_pipeline/', '/transforms/')


class WorkerLogFilter(logging.Filter):
  """Shows the project's own lines from worker processes; drops Beam's chatter.

  The job service relays each worker line as ``'Worker: %s'`` with the text of
  a LogEntry proto. Lines logged by our packages (progress, warnings about
  inputs) are rewritten to their plain message; Beam's own worker lines pass
  only from ERROR up (below that they are start-up notes such as
  "Discarding unparseable args").
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.msg != 'Worker: %s' or len(record.args or ()) != 1:
      return record.levelno >= logging.WARNING
    try:
      entry = text_format.Parse(record.args[0], beam_fn_api_pb2.LogEntry())
    except text_format.ParseError:
      return record.levelno >= logging.ERROR
    if any(package in entry.log_location for package in _OUR_PACKAGES):
      record.name, record.msg, record.args = 'worker', '%s', (entry.message,)
      return True
    return record.levelno >= logging.ERROR


def show_worker_logs() -> None:
  """Installs WorkerLogFilter on the job service's relay logger."""
  logger = logging.getLogger(WORKER_LOGGER)
  logger.setLevel(logging.INFO)
  if not any(isinstance(f, WorkerLogFilter) for f in logger.filters):
    logger.addFilter(WorkerLogFilter())


def summary_text(
  counters: Mapping[str, int], outputs: Mapping[str, str], seconds: float
) -> str:
  """The end-of-run summary printed on stdout."""
  slices = counters.get(SLICES_WRITTEN, 0)
  lines = [
    'Summary',
    f'  patients matched   {counters.get(reconciliation_counter(s.MATCHED), 0)}',
    f'  slices written     {slices}'
    f'  ({slices / seconds if seconds else 0:.1f} slices/s over {seconds:.1f} s)',
    f'  masks written      i: {counters.get(I_MASKS_WRITTEN, 0)}'
    f'  o: {counters.get(O_MASKS_WRITTEN, 0)}',
  ]
  issues = [
    (status, counters.get(reconciliation_counter(status), 0))
    for status in s.STATUSES
    if status != s.MATCHED
  ]
  lines.append(
    '  reconciliation     '
    + (', '.join(f'{status}: {n}' for status, n in issues if n) or 'no issues')
  )
  errors = [(stage, counters.get(error_counter(stage), 0)) for stage in s.STAGES]
  lines.append(
    '  errors             '
    + (', '.join(f'{stage}: {n}' for stage, n in errors if n) or 'none')
  )
  flags = sorted(
    (name.removeprefix('qa_'), n)
    for name, n in counters.items()
    if name.startswith('qa_') and n
  )
  lines.append(
    '  quality flags      ' + (', '.join(f'{flag}: {n}' for flag, n in flags) or 'none')
  )
  for name, path in outputs.items():
    lines.append(f'  {name:<18} {path}')
  return '\n'.join(lines)


def issue_count(counters: Mapping[str, int]) -> int:
  """Reconciliation problems plus error rows: 0 for a clean run."""
  return sum(
    counters.get(reconciliation_counter(status), 0)
    for status in s.STATUSES
    if status != s.MATCHED
  ) + sum(counters.get(error_counter(stage), 0) for stage in s.STAGES)
