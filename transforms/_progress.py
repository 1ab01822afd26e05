"""A worker's progress line: patients done, slices written, slices/s.

One Progress per run and worker process, shared by every DoFn instance and
thread in it, logs at most every few seconds. Worker processes' lines reach
the console through the runner (see ``beam_pipeline.console``).
"""

from __future__ import annotations

import logging
import os
import threading
import time

_LOG = logging.getLogger('transforms.progress')


class Progress:
  """Counts patients and slices; logs a line at most every ``interval`` s."""

  def __init__(self, interval: float):
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


def progress(run_id: str, interval: float) -> Progress:
  """This process's Progress for the run ``run_id`` (one per run and process)."""
  with _progress_lock:
    if run_id not in _progress:
      _progress.clear()  # a process serves one run at a time
      _progress[run_id] = Progress(interval)
    return _progress[run_id]
