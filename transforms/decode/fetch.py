"""Fetching a chunk's files, whatever the source: the decode stage's one
interface to where the bytes are.

``Fetcher.reads(items, whole_series)`` gives the bytes (or a Failed) of each
``(path, is_slice)`` item, in order. ``fetcher(input_root, settings)`` picks
the implementation:

- ``TreeFetcher``: every file from the tree; on a local disk read as asked,
  on an object store fetched ahead, ``read_concurrency`` requests out
  (prefetch.Prefetcher), so the network's latency overlaps with decoding;
- ``PacsFetcher``: slices from the DICOMweb server (a whole series in one
  request when the chunk is one, transforms.decode.series; an instance the
  series' answer does not bring is retrieved on its own), contour files
  from the tree; fetched ahead as on an object store.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from transforms.contract import metrics, schema
from transforms.contract.errors import FileTooLargeError
from transforms.decode import series
from transforms.io import dicomweb, files, prefetch, stores
from transforms.outcomes import Failed
from transforms.settings import DecodeSettings, Limits

_LOG = logging.getLogger(__name__)

Item = tuple[str, bool]  # (path, whether it is a slice)


class Fetcher(Protocol):
  """Where a chunk's bytes come from."""

  # Whether reads are queued ahead (the caller then starts the next chunk
  # before it finishes this one, so requests stay out across the gap).
  ahead: bool
  # Whether a decoder child may read a local file again itself rather than
  # be sent its bytes.
  rereadable: bool

  def reads(self, items: list[Item], whole_series: bool) -> Iterator[bytes | Failed]:
    """The bytes of each item, in order; ``whole_series``: the slices are
    one PACS series' instances."""
    ...

  def counts(self) -> dict[str, int]:
    """{counter name: count} of fetches since the last call."""
    ...

  def close(self) -> None: ...


class TreeFetcher:
  """Every file from the tree at ``root`` (a folder or an object store)."""

  rereadable = True

  def __init__(
    self,
    root: str,
    limits: Limits,
    concurrency: int,
    window_bytes: int,
    ahead: bool | None = None,
  ):
    """``ahead``: fetch ahead (default: on an object store, not locally)."""
    self._root = root
    self._limits = limits
    self.ahead = not stores.is_local(root) if ahead is None else ahead
    self._prefetcher = (
      prefetch.Prefetcher(concurrency, window_bytes) if self.ahead else None
    )

  def _read(self, item: Item) -> bytes | Failed:
    return files.read_or_fail(self._root, item[0], self._limits.max_file_bytes)

  def reads(self, items: list[Item], whole_series: bool) -> Iterator[bytes | Failed]:
    if self._prefetcher is None:
      return map(self._read, items)
    return self._prefetcher.fetch(items, self._read)

  def counts(self) -> dict[str, int]:
    return {}

  def close(self) -> None:
    if self._prefetcher is not None:
      self._prefetcher.close()


class PacsFetcher(TreeFetcher):
  """Slices from the DICOMweb server of ``settings.dicomweb``, contour files
  from the tree at ``root``.

  The requests in flight to the server (series answers being read
  included) are at most ``read_concurrency``; the instances a worker's
  series answers hold until used are at most ``max_chunk_bytes``.
  """

  rereadable = False

  def __init__(self, root: str, settings: DecodeSettings, window_bytes: int):
    concurrency = settings.store.read_concurrency
    super().__init__(root, settings.limits, concurrency, window_bytes, ahead=True)
    self._pacs = dicomweb.client(settings.dicomweb)
    self._slots = threading.BoundedSemaphore(max(1, concurrency))
    self._budget = series.Budget(settings.max_chunk_bytes)
    self._counts: collections.Counter[str] = collections.Counter()
    self._counts_lock = threading.Lock()
    self._stream_failures = 0

  def _count(self, name: str) -> None:
    with self._counts_lock:
      self._counts[name] += 1

  def counts(self) -> dict[str, int]:
    """The PACS fetches since the last call (the caller's thread adds them
    to Beam's counters, which are per thread)."""
    with self._counts_lock:
      counts, self._counts = dict(self._counts), collections.Counter()
    return counts

  def _read_from(self, stream: series.SeriesStream | None) -> Callable:
    def read(item: Item) -> bytes | Failed:
      path, is_slice = item
      if not is_slice:
        return self._read(item)
      if stream is not None:
        taken = stream.take(_instance_uid(path))
        if isinstance(taken, bytes):
          self._count(metrics.PACS_INSTANCES_STREAMED)
          return taken
        if taken is not None:  # FileTooLargeError
          return Failed(schema.STAGE_FETCH, str(taken))
      self._count(metrics.PACS_INSTANCES_RETRIEVED)
      try:
        with self._slots:
          return self._pacs.retrieve(path, self._limits.max_file_bytes)
      except FileTooLargeError as e:
        return Failed(schema.STAGE_FETCH, str(e))
      except Exception as e:  # DicomWebError (with its status) or a bug
        return Failed(schema.STAGE_FETCH, f'cannot retrieve: {e}')

    return read

  def _stream(self, paths: list[str]) -> series.SeriesStream | None:
    """A stream of the series that holds every one of ``paths`` (instance
    paths), or None if they are not of one series."""
    series_paths = {path.rpartition('/instances/')[0] for path in paths}
    if len(series_paths) != 1 or '' in series_paths:
      return None
    (series_path,) = series_paths
    pacs = self._pacs
    return series.SeriesStream(
      lambda: pacs.open_series(series_path),
      [_instance_uid(path) for path in paths],
      self._limits.max_file_bytes,
      self._budget,
      self._slots,
      self._stream_ended,
      attempts=pacs.attempts,
    )

  def _stream_ended(self, reason: str | None) -> None:
    if reason is None:
      return
    self._count(metrics.PACS_SERIES_INCOMPLETE)
    self._stream_failures += 1
    log = _LOG.warning if self._stream_failures == 1 else _LOG.debug
    log(
      'a WADO-RS series retrieve ended early (%s); what it did not bring is '
      'retrieved instance by instance',
      reason,
    )

  def reads(self, items: list[Item], whole_series: bool) -> Iterator[bytes | Failed]:
    stream = (
      self._stream([path for path, is_slice in items if is_slice])
      if whole_series
      else None
    )
    reads = self._prefetcher.fetch(items, self._read_from(stream))
    return reads if stream is None else _closing(reads, stream)


def fetcher(input_root: str, settings: DecodeSettings, window_bytes: int) -> Fetcher:
  """The fetcher of the slices' source: the PACS if one is set, else the tree."""
  if settings.dicomweb is not None:
    return PacsFetcher(input_root, settings, window_bytes)
  return TreeFetcher(
    input_root, settings.limits, settings.store.read_concurrency, window_bytes
  )


def _instance_uid(path: str) -> str:
  """The SOP Instance UID that ends a WADO-RS instance path."""
  return path.rpartition('/instances/')[2]


def _closing(reads: Iterator, stream: series.SeriesStream) -> Iterator:
  """``reads``, then ``stream`` closed (also when abandoned part-way)."""
  try:
    yield from reads
  finally:
    stream.close()
