"""The run's progress as the launcher shows it: totals, rate and ETA.

Worker processes keep their counts in small files in a progress folder
(``transforms._worker_progress``); a thread here sums them. When stderr is a
terminal it draws one live bar (tqdm), and log lines are printed above it;
otherwise it logs a line at most every ``--progress-seconds``::

    progress: 1,080/1,140 slices (95%), 2,112 slices/s, ETA 0:03, 4 patients done

The total is the slices of linked patients the launcher found before the run
(the labelled ones with --labeled-only); None when it was not counted (a tree
on an object store), and the line then has no percentage or ETA.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
import tempfile
import threading
import time

from beam_pipeline.launch import console
from transforms.contract.counts import read_counts

_LOG = logging.getLogger(__name__)
POLL_SECONDS = 0.5


def eta_text(seconds: float) -> str:
  """``0:03``, ``12:40``, ``3:02:10``."""
  seconds = int(round(seconds))
  hours, remainder = divmod(seconds, 3600)
  minutes, seconds = divmod(remainder, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'


def line(done: int, total: int | None, rate: float | None, patients: int) -> str:
  """One progress line (without the logger's prefix)."""
  parts = [
    f'{done:,}/{total:,} slices ({done / total:.0%})' if total else f'{done:,} slices'
  ]
  if rate:
    parts.append(f'{rate:,.0f} slices/s')
    if total and done < total:
      parts.append(f'ETA {eta_text((total - done) / rate)}')
  parts.append(f'{patients:,} patients done')
  return 'progress: ' + ', '.join(parts)


class Reporter:
  """Shows a run's progress while it runs; use as a context manager.

  Args:
    total: slices the run is expected to process, or None if unknown.
    interval: seconds between two progress lines (no live bar).
    live: draw a live bar instead of lines (default: stderr is a terminal).
  """

  def __init__(self, total: int | None, interval: float, live: bool | None = None):
    self.folder = ''
    self._total = total or None
    self._interval = interval
    self._live = sys.stderr.isatty() if live is None else live
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='progress', daemon=True)
    self._bar = None
    self._first: tuple[float, int] | None = None  # (time, slices) first seen
    self._last: dict[str, tuple[int, int]] = {}  # each count file's last record

  def __enter__(self) -> Reporter:
    self.folder = tempfile.mkdtemp(prefix='cardiac-mri-progress-')
    if self._live:
      from tqdm import tqdm

      # A terminal that reports no size (0 x 0) would hide the bar.
      sized = min(shutil.get_terminal_size((0, 0))) > 0
      self._bar = tqdm(
        total=self._total,
        unit=' slices',
        file=sys.stderr,
        dynamic_ncols=sized,
        ncols=None if sized else 100,
        nrows=None if sized else 24,
        smoothing=0.1,
        mininterval=POLL_SECONDS,
      )
      console.set_live_writer(functools.partial(tqdm.write, file=sys.stderr))
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    self._thread.join()
    slices, patients = read_counts(self.folder, self._last)
    if self._bar is not None:
      if exc_info[0] is None:
        self._update_bar(slices, patients)
      console.set_live_writer(None)
      self._bar.close()
    elif exc_info[0] is None and slices:
      rate = self._rate(time.monotonic(), slices)
      _LOG.info('%s', line(slices, self._total, rate, patients))
    shutil.rmtree(self.folder, ignore_errors=True)

  def _rate(self, now: float, slices: int) -> float | None:
    """Slices/s since the first count was seen (the start-up excluded)."""
    if self._first is None:
      if slices:
        self._first = (now, slices)
      return None
    seconds = now - self._first[0]
    return (slices - self._first[1]) / seconds if seconds >= 1 else None

  def _update_bar(self, slices: int, patients: int) -> None:
    self._bar.n = slices
    self._bar.set_postfix_str(f'{patients:,} patients done', refresh=False)
    self._bar.refresh()

  def _run(self) -> None:
    last_line = time.monotonic()
    while not self._stop.wait(POLL_SECONDS):
      now = time.monotonic()
      slices, patients = read_counts(self.folder, self._last)
      rate = self._rate(now, slices)
      if self._bar is not None:
        self._update_bar(slices, patients)
      elif slices and now - last_line >= self._interval:
        last_line = now
        _LOG.info('%s', line(slices, self._total, rate, patients))
