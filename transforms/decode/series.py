"""A series' instances from one WADO-RS series retrieve, taken in any order.

Retrieving a series in one request costs Orthanc about a tenth of the CPU of
retrieving its instances one by one, and the client a third (BENCHMARKS.md),
but the server sends the instances in an order of its own. ``SeriesStream``
reads the answer in a thread of its own (transforms.io.multipart), matches each
part to an instance by the SOP Instance UID of its data set
(``_native.instance_uid``), and keeps the parts still wanted until
``take(uid)`` asks for them.

Memory stays bounded: the parts held, by all the streams of a worker, are at
most a ``Budget``'s bytes; a part that would exceed it, and is not the one a
caller waits for, is let go and its instance retrieved on its own later
(``take`` returns None), as is every instance the answer does not hold or
does not name (a part whose UID cannot be read, a second part with the same
UID, a stream that fails part-way). The stream never waits for its callers,
so it always ends.

An answer that breaks off part-way (the connection drops, or a body without
a length ends before its last part) is asked for again, up to ``attempts``
requests in all with the backoff of ``transforms.io.http``; the parts that
already arrived are passed over unread, so each instance is handed over
once. A body that is malformed, not cut, is not asked for again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from transforms.contract.errors import FileTooLargeError
from transforms.decode import _native
from transforms.io import http, multipart

_LOG = logging.getLogger(__name__)


class Budget:
  """Bytes that the streams of one worker may hold between them."""

  def __init__(self, limit: int):
    self._limit = limit
    self._held = 0
    self._lock = threading.Lock()

  def claim(self, n: int, force: bool = False) -> bool:
    """Holds ``n`` bytes more if they fit (always with ``force``)."""
    with self._lock:
      if not force and self._held + n > self._limit:
        return False
      self._held += n
      return True

  def release(self, n: int) -> None:
    with self._lock:
      self._held -= n

  @property
  def held(self) -> int:
    return self._held


class SeriesStream:
  """The wanted instances of one series, read from its retrieve in a thread.

  Args:
    open_series: () -> (read, content type) of the series' answer; called in
      the stream's thread, inside ``slots``; raises when the server refuses.
    wanted: the SOP Instance UIDs asked for.
    limit: the largest instance kept (--max-file-bytes); a larger one is
      taken as FileTooLargeError.
    budget: shared by the worker's streams.
    slots: a semaphore bounding the worker's requests in flight; the stream
      holds one while it reads.
    on_end: called once in the stream's thread when it ends, with the
      reason it ended early (None: read to the end, or all found).
    attempts: requests of the series in all while its answer breaks off
      part-way (--request-attempts; each request itself is retried by the
      client on refusals and connection errors).
  """

  def __init__(
    self,
    open_series: Callable[[], tuple[Callable[[int], bytes], str, Callable[[], None]]],
    wanted: Iterable[str],
    limit: int | None,
    budget: Budget,
    slots: threading.Semaphore,
    on_end: Callable[[str | None], None] | None = None,
    attempts: int = 1,
  ):
    self._open = open_series
    self._attempts = max(1, attempts)
    self._stopped = threading.Event()  # set by close(): no more attempts
    self._wanted = set(wanted)
    self._limit = limit
    self._budget = budget
    self._slots = slots
    self._on_end = on_end
    self._cond = threading.Condition()
    self._held: dict[str, bytes | FileTooLargeError] = {}
    self._seen: set[str] = set()  # arrived (held, handed over or let go)
    self._waiting: set[str] = set()
    self._ended = False
    self._closing = False
    self._close_body: Callable[[], None] | None = None
    self.streamed = 0  # instances handed over from the stream
    self._thread = threading.Thread(target=self._run, name='series', daemon=True)
    self._thread.start()

  def _choose(self, headers, head: bytes) -> str | None:
    if self._closing:
      raise _Closed
    uid = _native.instance_uid(head)
    return uid if uid in self._wanted and uid not in self._seen else None

  def _run(self) -> None:
    reason = None
    try:
      with self._slots:
        for attempt in range(1, self._attempts + 1):
          if self._closing:
            return
          try:
            self._read_answer()
            break
          except http.BodyError as e:  # cut part-way: asked for again
            if self._closing or attempt == self._attempts:
              raise
            _LOG.debug('a series answer broke off (%s); asking again', e)
            if not http.wait(http.backoff(attempt), self._stopped):
              return
    except _Closed:
      pass
    except Exception as e:  # the server, the network or the body: retried alone
      if not self._closing:
        reason = str(e) or type(e).__name__
    finally:
      if self._on_end is not None:  # before a caller learns it must retrieve
        self._on_end(reason)
      with self._cond:
        self._ended = True
        self._cond.notify_all()

  def _read_answer(self) -> None:
    """Reads one answer to the series' request, keeping what is wanted.

    Raises:
      http.BodyError: it broke off, or ended before its last part.
    """
    read, content_type, close = self._open()
    with self._cond:
      self._close_body = close
    ended = False

    def read_tracked(n: int) -> bytes:
      nonlocal ended
      block = read(n)
      ended = ended or not block
      return block

    try:
      boundary = multipart.boundary_of(content_type)
      for part in multipart.parts(read_tracked, boundary, self._choose, self._limit):
        self._arrived(part)
        if self._seen >= self._wanted:
          break  # the rest of the answer is not needed
    except multipart.MultipartError as e:
      if ended:  # the body ended before the multipart did: it was cut
        raise http.BodyError(str(e)) from e
      raise
    finally:
      with self._cond:
        self._close_body = None
      close()

  def _arrived(self, part: multipart.Part) -> None:
    uid = part.key
    with self._cond:
      if self._closing:
        raise _Closed
      self._seen.add(uid)
      if part.data is None:
        self._held[uid] = FileTooLargeError(
          f'instance of {part.size} bytes is larger than --max-file-bytes '
          f'{self._limit}; not read'
        )
      elif self._budget.claim(len(part.data), force=uid in self._waiting):
        self._held[uid] = part.data
      else:  # no room: it is retrieved alone when it is asked for
        return
      self._cond.notify_all()

  def take(self, uid: str) -> bytes | FileTooLargeError | None:
    """The instance ``uid`` once it has arrived, or None if the stream will
    not bring it (retrieve it alone). Blocks while it may still come."""
    with self._cond:
      self._waiting.add(uid)
      try:
        while uid not in self._held and uid not in self._seen and not self._ended:
          self._cond.wait()
      finally:
        self._waiting.discard(uid)
      instance = self._held.pop(uid, None)
      if isinstance(instance, bytes):
        self.streamed += 1
    if isinstance(instance, bytes):
      self._budget.release(len(instance))
    return instance

  def close(self) -> None:
    """Stops reading and lets go of what is held (safe to call twice)."""
    self._stopped.set()
    with self._cond:
      self._closing = True
      close, self._close_body = self._close_body, None
      unclaimed, self._held = self._held, {}
      self._cond.notify_all()
    for data in unclaimed.values():
      if isinstance(data, bytes):
        self._budget.release(len(data))
    if close is not None and not self._ended:
      try:
        close()  # a read blocked on the network returns
      except Exception:
        _LOG.debug('closing a series answer', exc_info=True)


class _Closed(Exception):
  """The stream was closed by its owner."""
