"""Ctrl-C and SIGTERM: a clean stop, no tracebacks, no processes left behind.

``handle_signals()`` turns SIGINT and SIGTERM into an ``Interrupted``
exception in the main thread, once per run: a signal that comes while the
first one is being handled (the lock let go, the id map's parts removed,
the workers stopped) is only recorded, so that handling ends as it began.
``deferred()`` holds them back while the
dataset is being published, so an interrupt never leaves half of a new
dataset in place of the old one. ``stop_descendants()`` ends every process
the run started (Beam's worker processes, decoder children), wherever they
are in the tree, and every wait between the retries of a request in this
one's threads (``transforms.io.http.stop_waiting``); ``leave(code)`` ends
this process without waiting for its threads: one may be blocked reading
from a server that never answers, and Python's own exit would wait for it.

Beam-free, Linux /proc based (elsewhere descendants are not looked for).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import NoReturn

from transforms.contract.errors import causes
from transforms.io import http

_HANDLED = (signal.SIGINT, signal.SIGTERM)
# The exit codes of an interrupted run: 128 + the signal number.
EXIT_CODES = frozenset(128 + signum for signum in _HANDLED)


class Interrupted(BaseException):
  """A stop asked for by a signal (a BaseException, like KeyboardInterrupt,
  so that ``except Exception`` on the way up does not swallow it)."""

  def __init__(self, signum: int, published: bool = False):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum
    self.published = published

  @property
  def exit_code(self) -> int:
    """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + self.signum


_pending: list[int] = []  # held back by deferred()
_deferring = threading.Event()
# An Interrupted has been raised: the run is ending, later signals are only
# recorded (in _later) until handle_signals() arms the handlers again.
_stopping = threading.Event()
_later: list[int] = []


def _handler(signum, frame) -> None:
  if _stopping.is_set():
    _later.append(signum)
    return
  if _deferring.is_set():
    _pending.append(signum)
    return
  _stopping.set()
  raise Interrupted(signum)


def handle_signals() -> None:
  """Installs the handlers (main thread only; elsewhere it does nothing):
  the next signal raises Interrupted, those after it are only recorded
  (``ignored``). Retries wait again (an earlier run in this process may have
  been interrupted)."""
  if threading.current_thread() is not threading.main_thread():
    return
  http.resume_waiting()
  _stopping.clear()
  _pending.clear()
  _later.clear()
  for signum in _HANDLED:
    signal.signal(signum, _handler)


def stopping() -> None:
  """Marks the run as ending (as the first Interrupted does): from now on
  SIGINT and SIGTERM are only recorded, for a stop that did not come through
  the handlers (a KeyboardInterrupt before they were installed)."""
  _stopping.set()
  if threading.current_thread() is threading.main_thread():
    for signum in _HANDLED:
      signal.signal(signum, _handler)


def ignored() -> list[int]:
  """The signals that came while an interrupt was being handled (recorded,
  not raised), in order."""
  return list(_later)


def leave(code: int) -> NoReturn:
  """Ends the process now with ``code``, once an interrupt has been handled
  (the main thread has let go of the lock and printed its line): threads
  that still wait on a server are not waited for. Standard streams and log
  handlers are flushed first."""
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  with contextlib.suppress(Exception):
    logging.shutdown()
  os._exit(code)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds SIGINT and SIGTERM back for the block; raises Interrupted (with
  ``published=True``) after it if one arrived."""
  _deferring.set()
  try:
    yield
  finally:
    if _pending:  # set while still deferring: no signal is raised in between
      _stopping.set()
    _deferring.clear()
  if _pending:
    signum = _pending[0]
    _pending.clear()
    _stopping.set()
    raise Interrupted(signum, published=True)


def _children() -> dict[int, list[int]]:
  """{parent pid: [child pids]} of every process /proc shows."""
  tree: dict[int, list[int]] = {}
  try:
    names = os.listdir('/proc')
  except OSError:
    return tree
  for name in names:
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat', 'rb') as f:
        stat = f.read()
    except OSError:
      continue
    # The command name may hold spaces and parentheses: fields follow the last ')'.
    ppid = int(stat[stat.rindex(b')') + 2 :].split()[1])
    tree.setdefault(ppid, []).append(int(name))
  return tree


def descendants(pid: int | None = None) -> list[int]:
  """Every process below ``pid`` (default: this one), children first."""
  tree = _children()
  pids, queue = [], [pid or os.getpid()]
  while queue:
    for child in tree.get(queue.pop(0), []):
      pids.append(child)
      queue.append(child)
  return pids


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:  # a zombie has ended; only its parent's wait is missing
    with open(f'/proc/{pid}/stat', 'rb') as f:
      return f.read().rsplit(b')', 1)[1].split()[0] != b'Z'
  except OSError:
    return False


def stop_descendants(grace: float = 3.0) -> int:
  """Kills every descendant (SIGKILL: their work is discarded with the staging
  folder, and a gentler signal only makes Beam's workers print tracebacks),
  waits up to ``grace`` seconds for them to go. Returns how many there were.

  The threads of this process that wait to retry a request give up at once
  (until ``handle_signals`` installs the handlers of a new run)."""
  http.stop_waiting()
  pids = descendants()
  for pid in pids:
    with contextlib.suppress(ProcessLookupError, PermissionError):
      os.kill(pid, signal.SIGKILL)
  deadline = time.monotonic() + grace
  while time.monotonic() < deadline and any(_alive(p) for p in pids):
    time.sleep(0.05)
  with contextlib.suppress(ChildProcessError):
    while os.waitpid(-1, os.WNOHANG)[0]:  # reap our own children
      pass
  return len(pids)


def interrupted_by(e: BaseException) -> Interrupted | None:
  """The Interrupted behind ``e``: runners wrap what a DoFn raised, and the
  signal handler runs wherever the main thread is, often inside a DoFn."""
  return next((x for x in causes(e) if isinstance(x, Interrupted)), None)
