"""The HTTP client of the hot paths (DICOMweb's searches and retrieves): one
pooled urllib3 pool, and the retries of a whole exchange, its body included.

urllib3's own ``Retry`` covers a request up to its answer's headers: a body
read afterwards (``preload_content=False``) that breaks off is outside it,
and it honours any ``Retry-After``, an hour if a server asks. ``Pool.get``
retries instead the whole exchange: the request, the answer's status and the
reading of its body (``consume``), ``attempts`` tries in all, whichever of
them fails. Between tries it waits (``wait``) the backoff, or what the
server's ``Retry-After`` asks up to ``RETRY_AFTER_CAP``, with one warning
when it asks for longer. A wait ends at once when the run is interrupted
(``stop_waiting``, called as the command line handles the interrupt).
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from transforms.io.protocol import SPARE_CONNECTIONS

_LOG = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
# The backoff before the k-th retry (the first is at once, as urllib3's):
# BACKOFF_FACTOR x 2^(k-1) s, at most BACKOFF_MAX, plus up to JITTER.
BACKOFF_FACTOR = 0.1
BACKOFF_MAX = 20.0
JITTER = 0.5
# The longest wait a Retry-After may ask for; a longer one is cut to it.
RETRY_AFTER_CAP = 30.0
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60

T = TypeVar('T')
# beam_pipeline.launch.console.FILE_ONLY: a retry goes to the run's log file,
# not the console (a throttled run retries often).
_FILE_ONLY = {'file_only': True}


class BodyError(OSError):
  """An answer's body broke off or arrived cut short: the exchange is tried
  again (raised by ``consume``, or made from urllib3's read errors)."""


class NoAnswer(OSError):
  """No usable answer after every attempt.

  Attributes:
    attempts: how many were made.
    reason: why the last one failed (urllib3's reason, or the BodyError's).
    broken: the last attempt got an answer whose body broke off.
  """

  def __init__(self, reason: str, attempts: int, broken: bool):
    super().__init__(reason)
    self.reason = reason
    self.attempts = attempts
    self.broken = broken


class Stopped(OSError):
  """The run is being interrupted: no more waiting, no more attempts."""


_stopping = threading.Event()


def stop_waiting() -> None:
  """Ends every wait between attempts at once, in every thread, and the
  ones still to come (the run is being interrupted): each raises Stopped."""
  _stopping.set()


def resume_waiting() -> None:
  """Waits wait again, and a long Retry-After is warned of again: a new run
  in this process (``interrupts.handle_signals``)."""
  _stopping.clear()
  _long_retry_after.reset()


def wait(seconds: float, cancel: threading.Event | None = None) -> bool:
  """Sleeps ``seconds``; False if ``cancel`` was set first.

  Raises:
    Stopped: the run is being interrupted (``stop_waiting``).
  """
  if cancel is None:
    if _stopping.wait(seconds):
      raise Stopped('the run is being interrupted')
    return True
  deadline = time.monotonic() + seconds
  while (left := deadline - time.monotonic()) > 0:
    if _stopping.wait(min(left, 0.1)):
      raise Stopped('the run is being interrupted')
    if cancel.is_set():
      return False
  return not cancel.is_set()


def backoff(retry: int) -> float:
  """Seconds before the ``retry``-th retry (1 for the first): none for the
  first, then BACKOFF_FACTOR doubling, at most BACKOFF_MAX, plus up to JITTER."""
  if retry <= 1:
    return 0.0
  base = BACKOFF_FACTOR * 2 ** min(retry - 1, 32)
  return min(BACKOFF_MAX, base + random.random() * JITTER)


def retry_after(value: str | None, now: float | None = None) -> float | None:
  """The seconds a Retry-After header asks for (delay-seconds or an HTTP
  date), not capped; None when absent or unreadable."""
  if value is None:
    return None
  value = value.strip()
  if value.isascii() and value.isdigit():  # not '²' nor other Unicode digits
    return float(value)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError, IndexError):
    return None
  if when is None or when.tzinfo is None:
    return None
  return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Warned:
  """One warning per run about a server asking for long waits; the later
  ones go to the debug log."""

  def __init__(self):
    self._lock = threading.Lock()
    self._done = False

  def first(self) -> bool:
    with self._lock:
      first, self._done = not self._done, True
      return first

  def reset(self) -> None:
    """The next one is a first again (a new run)."""
    with self._lock:
      self._done = False


_long_retry_after = _Warned()


def pause(retry: int, asked: float | None) -> float:
  """The wait before the ``retry``-th retry: ``asked`` (a Retry-After) up
  to RETRY_AFTER_CAP, with a warning when it asks for more, else the backoff."""
  if asked is None:
    return backoff(retry)
  cap = RETRY_AFTER_CAP
  if asked > cap:
    log = _LOG.warning if _long_retry_after.first() else _LOG.debug
    log(
      'the server asked to wait %.0f s before retrying (Retry-After); waiting '
      '%.0f s, the longest this pipeline waits (docs/SOURCES.md)',
      asked,
      cap,
    )
    return cap
  return asked


class Answer(NamedTuple):
  """What ``consume`` made of an answer, with the answer's status."""

  status: int
  value: object


def _body_failure(e: BaseException) -> bool:
  """Whether ``e``, raised while reading a body, means the body broke off."""
  import urllib3

  return isinstance(e, BodyError | urllib3.exceptions.HTTPError | ConnectionError)


def _reason(e: BaseException) -> str:
  reason = getattr(e, 'reason', None) or e
  return str(reason) or type(reason).__name__


class Pool:
  """A worker's pooled connections and the retries of each exchange.

  Args:
    concurrency: connections kept (plus a few): the requests in flight.
    attempts: tries of each exchange, on connection errors, throttling and
      transient statuses (RETRIED_STATUSES), and bodies that break off.
    tls: urllib3's cert_reqs/ca_certs arguments.
  """

  def __init__(self, concurrency: int, attempts: int, tls: dict):
    import urllib3

    self.attempts = max(1, attempts)
    self._pool = urllib3.PoolManager(
      maxsize=concurrency + SPARE_CONNECTIONS,
      timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT),
      # urllib3 itself retries nothing (and so logs no URL): Pool.get does.
      retries=urllib3.Retry(
        total=None, connect=0, read=0, status=0, other=0, redirect=5
      ),
      **tls,
    )

  def get(
    self,
    url: str,
    headers: dict[str, str],
    consume: Callable[[object], T],
  ) -> Answer:
    """GET ``url``: Answer(status, consume(response)) of the first answer
    not retried, or of the last attempt's (a status still in
    RETRIED_STATUSES).

    ``consume`` gets the urllib3 response, its body not read; it reads what
    it needs and lets the connection go (``release_conn``), or keeps the
    response to read later. A BodyError or a read error it raises tries
    the exchange again; any other exception is raised as it is.

    Raises:
      NoAnswer: no answer, or only bodies that broke off, after the attempts.
      Stopped: the run is being interrupted.
    """
    for attempt in range(1, self.attempts + 1):
      last = attempt == self.attempts
      try:
        response = self._pool.request(
          'GET', url, headers=headers, preload_content=False
        )
      except Exception as e:  # urllib3's: no answer; it names no secret
        if last:
          raise NoAnswer(_reason(e), attempt, broken=False) from None
        self._retry(attempt, None, f'no answer: {_reason(e)}')
        continue
      if response.status in RETRIED_STATUSES and not last:
        asked = retry_after(response.headers.get('Retry-After'))
        _let_go(response)
        self._retry(attempt, asked, f'HTTP {response.status}')
        continue
      try:
        return Answer(response.status, consume(response))
      except Exception as e:
        _let_go(response)
        if not _body_failure(e):
          raise
        if last:
          raise NoAnswer(_reason(e), attempt, broken=True) from None
        self._retry(attempt, None, f'the answer broke off: {_reason(e)}')
    raise AssertionError('unreachable')  # the last attempt returns or raises

  def _retry(self, attempt: int, asked: float | None, why: str) -> None:
    """Waits before attempt ``attempt + 1``, saying so in the log file (the
    request's URL is not named: it may name a patient)."""
    delay = pause(attempt, asked)
    _LOG.info(
      'Retrying a request (attempt %d of %d) in %.1f s: %s',
      attempt + 1,
      self.attempts,
      delay,
      why,
      extra=_FILE_ONLY,
    )
    wait(delay)


def _let_go(response) -> None:
  """Drops an answer not read to its end (and its connection)."""
  try:
    response.close()
  finally:
    response.release_conn()


def reader(response) -> Callable[[int], bytes]:
  """``read(n)`` of an answer's body (b'' at its end), raising BodyError
  when it breaks off."""

  def read(n: int) -> bytes:
    try:
      return response.read(n)
    except Exception as e:
      if _body_failure(e):
        raise BodyError(f'the answer broke off: {_reason(e)}') from None
      raise

  return read
