"""Reading files ahead of their use, a bounded number of requests out."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor


class _Entry:
  __slots__ = ('path', 'read', 'future')

  def __init__(self, path, read):
    self.path, self.read, self.future = path, read, None


class Prefetcher:
  """Reads files ahead of their use, up to ``concurrency`` requests out.

  ``fetch(paths, read)`` queues ``paths`` at once and returns an iterator of
  ``read(path)`` for each, in order, while the next ones are already on
  their way, so waiting on the network overlaps with the caller's decoding.
  Queues are served first come, first served: a caller that queues its next
  batch before consuming the current one (the decode stage queues the next
  chunk's files, transforms.decode.stage) keeps requests out across the gap.
  Made once per worker (its threads persist).

  Memory stays bounded whatever the files' sizes: requests sent and not yet
  consumed are at most ``_FIRST_DEPTH`` until a file has arrived, then what
  ``budget`` bytes allow at the largest file seen so far (one at a time once
  files are as large as the budget), and never more than ``concurrency``.
  """

  _FIRST_DEPTH = 4

  def __init__(self, concurrency: int, budget: int):
    self._concurrency = max(1, concurrency)
    self._budget = budget
    self._largest = 0
    self._waiting: collections.deque[_Entry] = collections.deque()
    self._out = 0  # sent and not yet consumed
    self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix='fetch')

  def _depth(self) -> int:
    if not self._largest:
      return min(self._concurrency, self._FIRST_DEPTH)
    return max(1, min(self._concurrency, self._budget // self._largest))

  def _send(self, entry: _Entry) -> None:
    entry.future = self._pool.submit(entry.read, entry.path)
    self._out += 1

  def _top_up(self) -> None:
    while self._waiting and self._out < self._depth():
      entry = self._waiting.popleft()
      if entry.future is None:
        self._send(entry)

  def fetch(self, paths: list, read: Callable) -> Iterator:
    entries = [_Entry(path, read) for path in paths]
    self._waiting.extend(entries)
    self._top_up()
    return self._results(entries)

  def _results(self, entries: list[_Entry]) -> Iterator:
    try:
      for entry in entries:
        if entry.future is None:  # queued behind others: needed now
          self._send(entry)
        result = entry.future.result()
        entry.future = _DONE
        self._out -= 1
        if isinstance(result, bytes | bytearray | memoryview):
          self._largest = max(self._largest, len(result))
        self._top_up()
        yield result
    finally:  # abandoned part-way: what it still holds is let go
      for entry in entries:
        if entry.future is not None and entry.future is not _DONE:
          self._out -= 1
        entry.future = _DONE

  def close(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


_DONE = object()  # an entry whose result was consumed
