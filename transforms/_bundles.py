"""Work kept ahead within a bundle, what a DoFn emits from ``finish_bundle``,
and the one value a stage leaves for the launcher.

Stages that keep work ahead within a bundle (the decode stage's next chunk,
the PACS searches and the object-store listings in flight) emit the rest
when the bundle ends, where no input element gives the outputs a window.
Stages whose result the launcher reads when the job is done (the duplicate
plan, the patients' fingerprints) write it as one JSON file
(``WriteJsonFn``).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.io import stores


def in_global_window(value) -> WindowedValue:
  """An output of finish_bundle, which has no input element to take its
  window from: the pipeline's only window."""
  return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


def finished(outputs: Iterable) -> Iterator:
  """``outputs`` (main values and TaggedOutputs) as finish_bundle must emit
  them: each in the global window."""
  for output in outputs:
    if isinstance(output, pvalue.TaggedOutput):
      yield pvalue.TaggedOutput(output.tag, in_global_window(output.value))
    else:
      yield in_global_window(output)


class Ahead:
  """Calls run on ``depth`` threads while the bundle goes on, their results
  taken in the order the calls were put, so a worker with many elements that
  each wait on a server (a search, a listing) has ``depth`` of them waiting
  at once rather than one after another.

  Made in ``setup`` (its threads persist); ``drop`` in ``start_bundle`` (what
  a failed bundle left is not emitted twice), ``rest`` in ``finish_bundle``,
  ``close`` in ``teardown``.
  """

  def __init__(self, depth: int, name: str):
    self.depth = max(1, depth)
    self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix=name)
    self._pending: collections.deque[Future] = collections.deque()

  def put(self, call: Callable, *args) -> list:
    """Starts ``call(*args)``; returns the results that are ready, the
    oldest first (waiting for the oldest while more than ``depth`` run)."""
    self._pending.append(self._pool.submit(call, *args))
    ready = []
    while self._pending and (
      len(self._pending) > self.depth or self._pending[0].done()
    ):
      ready.append(self._pending.popleft().result())
    return ready

  def rest(self) -> Iterator:
    """The results not yet taken, in order, each waited for."""
    while self._pending:
      yield self._pending.popleft().result()

  def drop(self) -> None:
    for future in self._pending:
      future.cancel()
    self._pending.clear()

  def close(self) -> None:
    self.drop()
    self._pool.shutdown(wait=False, cancel_futures=True)


class WriteJsonFn(beam.DoFn):
  """Writes its one input value as JSON to ``path``; emits the path."""

  def __init__(self, path: str, config: stores.StoreConfig):
    self._path = path
    self._config = config

  def setup(self):
    stores.configure(self._config)

  def process(self, value):
    stores.write_bytes(self._path, json.dumps(value, indent=1, sort_keys=True).encode())
    yield self._path
