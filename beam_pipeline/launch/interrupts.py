"""Ctrl-C and SIGTERM: a clean stop, no tracebacks, no processes left behind.

``handle_signals()`` turns SIGINT and SIGTERM into an ``Interrupted``
exception in the main thread. ``deferred()`` holds them back while the
dataset is being published, so an interrupt never leaves half of a new
dataset in place of the old one. ``stop_descendants()`` ends every process
the run started (Beam's worker processes, decoder children), wherever they
are in the tree.

Beam-free, Linux /proc based (elsewhere descendants are not looked for).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

from transforms.contract.errors import causes

_HANDLED = (signal.SIGINT, signal.SIGTERM)


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


_pending: list[int] = []
_deferring = threading.Event()


def _handler(signum, frame) -> None:
  if _deferring.is_set():
    _pending.append(signum)
    return
  raise Interrupted(signum)


def handle_signals() -> None:
  """Installs the handlers (main thread only; elsewhere it does nothing)."""
  if threading.current_thread() is not threading.main_thread():
    return
  for signum in _HANDLED:
    signal.signal(signum, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds SIGINT and SIGTERM back for the block; raises Interrupted (with
  ``published=True``) after it if one arrived."""
  _deferring.set()
  try:
    yield
  finally:
    _deferring.clear()
  if _pending:
    signum = _pending[0]
    _pending.clear()
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
  waits up to ``grace`` seconds for them to go. Returns how many there were."""
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
