"""A worker process's progress: slices and patients done.

One Progress per run and worker process, shared by every DoFn instance and
thread in it. On a local runner the launcher hands the run a progress folder
(``DecodeSettings.progress_dir``): each process keeps its counts in one small
file there, which the launcher sums into the run's progress line or live bar
(``beam_pipeline.launch.progress``). Where that folder does not exist (a worker on
another machine) the process logs its own line at most every ``interval``
seconds instead; those lines reach the console through the runner.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from transforms.contract import counts

_LOG = logging.getLogger('transforms.progress')
WRITE_SECONDS = 0.25  # the shortest time between two writes of a count file


class Progress:
  """Counts the slices and patients this process has done."""

  def __init__(self, interval: float, folder: str | None = None):
    self._interval = interval
    self._folder = folder if folder and os.path.isdir(folder) else None
    self._lock = threading.Lock()
    self._start = None
    self._last = 0.0
    self._patients = 0
    self._slices = 0

  def add(self, patients: int = 0, slices: int = 0) -> None:
    now = time.monotonic()
    with self._lock:
      if self._start is None:
        self._start = now
        if not self._folder:  # the first line after one interval
          self._last = now
      self._patients += patients
      self._slices += slices
      if now - self._last < (WRITE_SECONDS if self._folder else self._interval):
        return
      self._last = now
      elapsed = now - self._start
      patients, slices = self._patients, self._slices
      if self._folder:
        self._write(slices, patients)
        return
    _LOG.info(
      'progress: %d patients done, %d slices done, %.1f slices/s (process %d)',
      patients,
      slices,
      slices / elapsed if elapsed else 0.0,
      os.getpid(),
    )

  def flush(self) -> None:
    """Writes the count file now (the last chunk's count, for one)."""
    with self._lock:
      if self._folder:
        self._write(self._slices, self._patients)

  def _write(self, slices: int, patients: int) -> None:
    try:
      counts.write_counts(self._folder, slices, patients)
    except OSError:  # the folder went away: the run is over
      self._folder = None


_progress: dict[str, Progress] = {}
_progress_lock = threading.Lock()


def progress(run_id: str, interval: float, folder: str | None = None) -> Progress:
  """This process's Progress for the run ``run_id`` (one per run and process)."""
  with _progress_lock:
    if run_id not in _progress:
      _progress.clear()  # a process serves one run at a time
      _progress[run_id] = Progress(interval, folder)
    return _progress[run_id]
