"""DICOMweb: QIDO-RS searches and WADO-RS retrieves from a PACS.

One :class:`DicomWebClient` per worker process (``client()``), on one pooled
urllib3 connection pool with bounded connections; every exchange, its body
included, is retried with backoff and jitter (``http.Pool``). A search is
paged until an empty page, an instance being its (study, series, SOP) UIDs;
a server whose pages repeat one another (it ignores ``offset``) is searched
once without a limit, and a search that cannot be had whole is an error,
never a shorter list. An instance is retrieved as it is stored
(``transfer-syntax=*``: the server is never asked to transcode) and its bytes
go to the same decode stage as a file of a tree.

Credentials never travel in options, URLs or messages: they are read where
they are used, from the environment (``DICOMWEB_USERNAME`` and
``DICOMWEB_PASSWORD``, or ``DICOMWEB_TOKEN``) or from ``--dicomweb-auth-file``,
a JSON file that others may not read.

dicomweb-client was considered and not used: it parses every retrieved
instance with pydicom in the calling process, where this pipeline needs the
raw bytes (the native reader, ``--max-file-bytes`` before parsing, and the
isolated decoder child for anything pydicom must read).
"""

from __future__ import annotations

import collections
import dataclasses
import email.message
import fnmatch
import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from transforms.contract import local_files
from transforms.contract.errors import FileTooLargeError, UsageError
from transforms.io import http

_LOG = logging.getLogger(__name__)

ENV_USERNAME = 'DICOMWEB_USERNAME'
ENV_PASSWORD = 'DICOMWEB_PASSWORD'
ENV_TOKEN = 'DICOMWEB_TOKEN'
DEFAULT_PAGE_SIZE = 1000
# How slices are retrieved (--dicomweb-retrieve).
SERIES = 'series'
INSTANCE = 'instance'
RETRIEVE_MODES = (SERIES, INSTANCE)
# What a multipart envelope may add to an instance's bytes.
_ENVELOPE_BYTES = 64 * 1024
# The largest search page read (a page of 1,000 instances is about 1 MB).
_MAX_PAGE_BYTES = 256 * 1024 * 1024
# The most instances a patient's search may list (a server that pages on
# forever, new UIDs each time, is refused before memory runs out).
_MAX_INSTANCES = 1_000_000
_ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'

# The attributes a search returns, by tag (DICOM JSON keys).
PATIENT_ID = '00100020'
STUDY_UID = '0020000D'
SERIES_UID = '0020000E'
SOP_UID = '00080018'
INSTANCE_NUMBER = '00200013'
SERIES_NUMBER = '00200011'
SERIES_DESCRIPTION = '0008103E'
MODALITY = '00080060'
_INCLUDED = (INSTANCE_NUMBER, SERIES_NUMBER, SERIES_DESCRIPTION, MODALITY)
SERIES_INSTANCE_COUNT = '00201209'  # NumberOfSeriesRelatedInstances
_UID_RE = re.compile(r'[0-9]+(\.[0-9]+)*')


@dataclasses.dataclass(frozen=True)
class DicomWebConfig:
  """How to reach a DICOMweb server; no secret in it (see auth_headers).

  Attributes:
    url: the service root, e.g. http://127.0.0.1:8042/dicom-web.
    auth_file: a JSON file with {"username", "password"} or {"token"}.
    ca_bundle: CA certificates that verify the server (default: the system's).
    concurrency: connections per worker (the decode stage keeps at most
      --read-concurrency retrieves in flight).
    attempts: tries per request (throttling, 5xx and connection errors).
    page_size: instances asked for per search page (limit/offset).
    retrieve: SERIES (a patient's series in one request, transforms.decode.series)
      or INSTANCE (one request per instance).
  """

  url: str
  auth_file: str | None = None
  ca_bundle: str | None = None
  concurrency: int = 32
  attempts: int = 8
  page_size: int = DEFAULT_PAGE_SIZE
  retrieve: str = SERIES


class DicomWebError(OSError):
  """A request failed after its retries; ``status`` is the HTTP status (None
  when no response came)."""

  def __init__(self, message: str, status: int | None = None):
    super().__init__(message)
    self.status = status


class IncompleteSearchError(DicomWebError):
  """A patient's instances could not all be listed: the server's pages
  repeat one another and its whole answer is capped."""


def check_url(url: str) -> str:
  """``url`` without a trailing slash.

  Raises:
    UsageError: not http(s), or it carries a user name, password, query or
      fragment (credentials never go on the command line).
  """
  parts = urlsplit(url)
  if parts.scheme not in ('http', 'https') or not parts.hostname:
    raise UsageError(f'--dicomweb-url must be an http:// or https:// URL, got {url!r}')
  if parts.username is not None or parts.password is not None:
    raise UsageError(
      '--dicomweb-url must not hold a user name or password: set '
      f'{ENV_USERNAME}/{ENV_PASSWORD} or {ENV_TOKEN}, or use --dicomweb-auth-file'
    )
  if parts.query or parts.fragment:
    raise UsageError('--dicomweb-url must not hold a query or a fragment')
  return url.rstrip('/')


def _read_auth_file(path: str) -> dict:
  # The key file's check: a regular file, not a link or a FIFO, that no
  # other user may read or write.
  data = local_files.read_private(path, '--dicomweb-auth-file')
  try:
    credentials = json.loads(data.decode('utf-8'))
  except ValueError:  # never quote the file: it holds a secret
    raise UsageError(f'--dicomweb-auth-file {path} is not valid JSON') from None
  if not isinstance(credentials, dict) or not (
    isinstance(credentials.get('token'), str)
    or isinstance(credentials.get('username'), str)
  ):
    raise UsageError(
      f'--dicomweb-auth-file {path} must hold {{"username": ..., "password": ...}} '
      'or {"token": ...}'
    )
  return credentials


def auth_headers(config: DicomWebConfig) -> dict[str, str]:
  """The Authorization header from --dicomweb-auth-file, or else from the
  environment; {} without credentials.

  Raises:
    UsageError: the auth file is readable by others, unreadable or malformed.
  """
  import base64

  if config.auth_file is not None:
    credentials = _read_auth_file(config.auth_file)
  else:
    credentials = {
      'token': os.environ.get(ENV_TOKEN),
      'username': os.environ.get(ENV_USERNAME),
      'password': os.environ.get(ENV_PASSWORD, ''),
    }
  if credentials.get('token'):
    return {'Authorization': f'Bearer {credentials["token"]}'}
  if credentials.get('username'):
    pair = f'{credentials["username"]}:{credentials.get("password") or ""}'.encode()
    return {'Authorization': f'Basic {base64.b64encode(pair).decode("ascii")}'}
  return {}


class Instance(NamedTuple):
  """One instance found by a search: its UIDs and what chooses a series."""

  study: str
  series: str
  sop: str
  number: str  # InstanceNumber as given ('' when absent)
  series_number: str
  series_description: str
  modality: str
  patient_id: str | None  # None when the server did not return it

  @property
  def key(self) -> tuple[str, str, str]:
    """What tells it from any other instance: (study, series, SOP) UIDs. A
    copy of an instance in another series (its SOP Instance UID kept) is
    another instance."""
    return (self.study, self.series, self.sop)

  @property
  def path(self) -> str:
    """Its WADO-RS path under the service root (its dicom_path)."""
    return f'studies/{self.study}/series/{self.series}/instances/{self.sop}'

  def uid_problem(self, withheld: bool = False) -> str | None:
    """Why its UIDs cannot name a URL path, or None; ``withheld``: without
    the UID's value (under pseudonymisation)."""
    for name, uid in (
      ('study', self.study),
      ('series', self.series),
      ('SOP', self.sop),
    ):
      if len(uid) > 64 or not _UID_RE.fullmatch(uid):
        detail = f' of {len(uid)} characters' if withheld else f' {uid[:80]!r}'
        return f'the server gave an invalid {name} instance UID{detail}'
    return None


def _value(item: dict, tag: str) -> str:
  """The first value of ``tag`` in a DICOM JSON object, as text ('' if none)."""
  values = (item.get(tag) or {}).get('Value') or []
  if not values or values[0] is None:
    return ''
  first = values[0]
  if isinstance(first, dict):  # a person name
    first = first.get('Alphabetic', '')
  return str(first).strip()


def instance_of(item: dict) -> Instance:
  """An Instance from one DICOM JSON object of a QIDO-RS answer."""
  return Instance(
    study=_value(item, STUDY_UID),
    series=_value(item, SERIES_UID),
    sop=_value(item, SOP_UID),
    number=_value(item, INSTANCE_NUMBER),
    series_number=_value(item, SERIES_NUMBER),
    series_description=_value(item, SERIES_DESCRIPTION),
    modality=_value(item, MODALITY),
    patient_id=_value(item, PATIENT_ID) if PATIENT_ID in item else None,
  )


SERIES_FILTER_KEYS = {
  'SeriesDescription': 'series_description',
  'SeriesNumber': 'series_number',
  'Modality': 'modality',
  'SeriesInstanceUID': 'series',
}


class SeriesFilter(NamedTuple):
  """``--series-filter KEYWORD=PATTERN``: a series is kept when its
  attribute matches the shell-style PATTERN (``*``, ``?``, ``[...]``),
  ignoring case."""

  keyword: str
  pattern: str

  def matches(self, instance: Instance) -> bool:
    value = getattr(instance, SERIES_FILTER_KEYS[self.keyword])
    return fnmatch.fnmatchcase(value.casefold(), self.pattern.casefold())

  def __str__(self) -> str:
    return f'{self.keyword}={self.pattern}'


def parse_series_filter(text: str) -> SeriesFilter:
  """Raises UsageError unless ``text`` is KEYWORD=PATTERN with a known keyword."""
  keyword, sep, pattern = text.partition('=')
  if not sep or keyword not in SERIES_FILTER_KEYS or not pattern:
    raise UsageError(
      f'--series-filter {text!r} must be KEYWORD=PATTERN with KEYWORD one of '
      f'{", ".join(SERIES_FILTER_KEYS)}, e.g. SeriesDescription=*cine*'
    )
  return SeriesFilter(keyword, pattern)


def _single_part(body: bytes, content_type: str) -> bytes:
  """The one instance in a WADO-RS answer (multipart/related, or a bare
  application/dicom body)."""
  message = email.message.Message()
  message['content-type'] = content_type or 'application/octet-stream'
  kind = message.get_content_type()
  if kind == 'application/dicom':
    return body
  boundary = message.get_param('boundary')
  if kind != 'multipart/related' or not isinstance(boundary, str):
    raise DicomWebError(f'the server answered {kind}, not multipart/related')
  delimiter = b'--' + boundary.encode('latin-1')
  start = body.find(delimiter)
  head_end = body.find(b'\r\n\r\n', start)
  if start < 0 or head_end < 0:
    raise http.BodyError('the server sent a malformed multipart answer')
  head = email.message_from_bytes(body[start + len(delimiter) : head_end].lstrip())
  content = head_end + 4
  length = (head.get('Content-Length') or '').strip()
  if length.isdigit():  # exact, even if the content holds the boundary
    end = content + int(length)
    if not body.startswith(b'\r\n' + delimiter, end):
      raise http.BodyError('the server sent a truncated multipart answer')
  else:
    end = body.find(b'\r\n' + delimiter, content)
  if end < 0:
    raise http.BodyError('the server sent a truncated multipart answer')
  if head.get_content_type() != 'application/dicom':
    raise DicomWebError(f'the server sent a {head.get_content_type()} part')
  if len(body) < end + 2 + len(delimiter) + 2:  # cut before the close delimiter
    raise http.BodyError('the server sent a truncated multipart answer')
  if not body.startswith(b'--', end + 2 + len(delimiter)):
    raise DicomWebError('the server sent more than one instance for one instance')
  return body[content:end]


class _Page(NamedTuple):
  """One search answer: its instances, how many items it held, and whether
  the server said it left some out (a Warning header, PS3.18)."""

  instances: list[Instance]
  items: int
  capped: bool


def _capped(warning: str) -> bool:
  """Whether a Warning header says the answer holds fewer results than
  match (PS3.18: "299 ...: The number of results exceeded the maximum
  supported by the server. Additional results can be requested.")."""
  text = warning.casefold()
  return 'exceed' in text or 'additional results' in text


def _identity(instance: Instance) -> tuple:
  """What a search dedupes by: the instance's key, or all it holds when its
  UIDs are not UIDs (each such instance stays, to be an error row)."""
  return instance.key if instance.uid_problem() is None else tuple(instance)


class DicomWebClient:
  """Searches and retrieves on one DICOMweb service, from one worker."""

  def __init__(self, config: DicomWebConfig, headers: dict[str, str] | None = None):
    """``headers``: the Authorization header (default: auth_headers(config))."""
    self._root = check_url(config.url)
    self._headers = auth_headers(config) if headers is None else headers
    self._page_size = config.page_size
    tls = {'cert_reqs': 'CERT_REQUIRED'}
    if config.ca_bundle:
      tls['ca_certs'] = config.ca_bundle
    self._pool = http.Pool(config.concurrency, config.attempts, tls)
    self._repeating = 0  # searches whose pages repeated one another

  @property
  def attempts(self) -> int:
    """Tries of each request (--request-attempts)."""
    return self._pool.attempts

  def _exchange(self, relative: str, accept: str, consume) -> http.Answer:
    """Answer(status, consume(response)) of a GET below the service root,
    retried (http.Pool.get).

    Raises:
      DicomWebError: no answer, or only answers that broke off, after the
        retries.
    """
    try:
      return self._pool.get(
        f'{self._root}/{relative}', {**self._headers, 'Accept': accept}, consume
      )
    except http.NoAnswer as e:  # urllib3's reason or ours: it names no secret
      if e.broken:
        raise DicomWebError(
          f'the answer broke off {e.attempts} times: {e.reason}'
        ) from None
      raise DicomWebError(
        f'no answer from the server after {e.attempts} attempts: {e.reason}'
      ) from None

  def _get(self, relative: str, accept: str, limit: int | None = None, parse=None):
    """(status, headers, body) of a GET below the service root, the body
    read whole but never past ``limit`` bytes; ``parse(status, headers,
    body)``, if given, replaces the body by what it returns (a BodyError it
    raises retries the request).

    Raises:
      DicomWebError: no answer after the retries.
      _Oversized: the body holds more than ``limit`` bytes.
    """

    def consume(response):
      try:
        declared = response.headers.get('Content-Length') or ''
        size = int(declared) if declared.isascii() and declared.isdigit() else 0
        if limit is not None and size > limit:
          raise _Oversized(size)  # not worth draining: the connection is dropped
        body = response.read(None if limit is None else limit + 1)
        if limit is not None and len(body) > limit:
          raise _Oversized(len(body))
      except BaseException:
        response.close()
        raise
      finally:
        response.release_conn()
      if parse is not None:
        body = parse(response.status, response.headers, body)
      return response.headers, body

    status, (headers, body) = self._exchange(relative, accept, consume)
    return status, headers, body

  def _failed(self, status: int, what: str) -> DicomWebError:
    from http import HTTPStatus

    try:
      phrase = HTTPStatus(status).phrase
    except ValueError:
      phrase = ''
    retried = (
      f' after {self.attempts} attempts' if status in http.RETRIED_STATUSES else ''
    )
    return DicomWebError(f'{what}: HTTP {status} {phrase}{retried}'.strip(), status)

  def check(self) -> None:
    """One small search, to find wrong credentials or URLs before a run.

    Raises:
      DicomWebError: the server cannot be reached or refuses the search.
    """
    status, _, _ = self._get('studies?limit=1', 'application/dicom+json')
    if status not in (200, 204):
      raise self._failed(status, f'QIDO-RS {self._root}/studies')

  def _search(
    self, level: str, query: list[tuple[str, object]], what: str
  ) -> tuple[list, bool]:
    """The items of one QIDO-RS answer (``level``: instances or series),
    and whether the server said it capped them: (items, capped).

    Raises:
      DicomWebError: the search failed after the retries, or its answer is
        not a JSON list.
    """

    def parse(status, headers, body):
      if status != 200 or not body.strip():
        return None
      try:
        page = json.loads(body)
      except ValueError as e:  # ended early: cut off; anything else: not JSON
        if getattr(e, 'pos', 0) >= len(body.rstrip()):
          raise http.BodyError('the server sent a search answer cut short') from None
        raise DicomWebError(
          'the server sent a search answer that is not JSON'
        ) from None
      if not isinstance(page, list):
        raise DicomWebError('the server sent a search page that is not a list')
      return page

    try:
      status, headers, page = self._get(
        f'{level}?{urlencode(query)}',
        'application/dicom+json',
        _MAX_PAGE_BYTES,
        parse,
      )
    except _Oversized as e:
      raise DicomWebError(f'a search page of over {e.size} bytes') from None
    if status not in (200, 204):
      raise self._failed(status, what)
    return page or [], _capped(headers.get('Warning') or '')

  def _page(self, patient_id: str, offset: int | None) -> _Page:
    """One page of the patient's instances (offset None: all of them, no
    limit asked)."""
    paging = [] if offset is None else [('limit', self._page_size), ('offset', offset)]
    items, capped = self._search(
      'instances',
      [('PatientID', patient_id), *[('includefield', tag) for tag in _INCLUDED]]
      + paging,
      f'QIDO-RS search for PatientID {patient_id}',
    )
    instances = [instance_of(item) for item in items if isinstance(item, dict)]
    return _Page(instances, len(items), capped)

  def search(self, patient_id: str) -> Iterator[Instance]:
    """Every instance whose PatientID is ``patient_id``, each once: pages of
    ``limit``/``offset`` until an empty one.

    A page that holds an instance an earlier page gave (the server ignores
    ``offset``, or its order moved between pages) means pages cannot be
    trusted: the patient is searched once without a limit instead. Either
    way the instances listed are checked: the server must not say that it
    left some out (a Warning header on the last pages, or on the answer
    without a limit), and no series may hold more instances than are listed
    of it (``NumberOfSeriesRelatedInstances``, one series search).

    Raises:
      DicomWebError: a page could not be had.
      IncompleteSearchError: the instances listed are not all there are:
        the server says so, or the series hold more, or (pages repeating
        one another) the answer without a limit lacks some the pages gave.
    """
    found = self._paged(patient_id)
    for instance in found.values():
      if instance.patient_id in (None, patient_id):  # not a looser match
        yield instance

  def _paged(self, patient_id: str) -> dict[tuple, Instance]:
    """The patient's instances, by identity, from its pages (or, if they
    repeat one another, from one search without a limit), checked.

    Raises:
      IncompleteSearchError: see :meth:`search`.
    """
    found: dict[tuple, Instance] = {}
    offset, capped = 0, False
    while True:
      page = self._page(patient_id, offset)
      if not page.items:
        capped = capped or page.capped  # "more", and then nothing more
        break
      if any(_identity(instance) in found for instance in page.instances):
        return self._whole(patient_id, found, offset)
      for instance in page.instances:
        found.setdefault(_identity(instance), instance)
      # A Warning on a page paging goes past means that page was cut to
      # the server's own limit: only the last pages' matter.
      capped = page.capped
      offset += page.items
      if len(found) > _MAX_INSTANCES:
        raise DicomWebError(
          f'the server lists more than {_MAX_INSTANCES:,} instances for one patient'
        )
    why = self._shortfall(patient_id, found, capped)
    if why is not None:
      raise IncompleteSearchError(
        f'the server ends its search pages at {offset} instances ({why}): '
        "the patient's instances cannot all be listed, so none of them is used"
      )
    return found

  def _whole(
    self, patient_id: str, paged: dict[tuple, Instance], offset: int
  ) -> dict[tuple, Instance]:
    """The patient's instances from one search without a limit, once its
    pages have repeated one another; checked against what the pages gave
    and against the series' instance counts, where the server gives them.

    Raises:
      IncompleteSearchError: that answer is capped.
    """
    self._repeating += 1
    log = _LOG.warning if self._repeating == 1 else _LOG.debug
    log(
      'the server gave a search page holding instances an earlier page gave '
      '(it seems to ignore offset): searching without a limit instead'
    )
    whole = self._page(patient_id, None)
    found = {_identity(instance): instance for instance in whole.instances}
    lacking = sum(key not in found for key in paged)
    why = self._shortfall(patient_id, found, whole.capped, lacking)
    if why is None:
      return found
    raise IncompleteSearchError(
      f'the server repeats its search pages (it seems to ignore offset; '
      f'{offset} instances found by paging) and caps its answer without a '
      f"limit ({len(found)} instances; {why}): the patient's instances "
      'cannot all be listed, so none of them is used'
    )

  def _shortfall(
    self,
    patient_id: str,
    found: dict[tuple, Instance],
    capped: bool,
    lacking: int = 0,
  ) -> str | None:
    """Why the instances ``found`` cannot be all the patient's (the server
    said it ``capped`` its answer, the answer is ``lacking`` instances
    paging gave, or a series counts more instances than are listed of it),
    in words; None when nothing says so."""
    if capped:
      return 'it says it left results out'
    if lacking:
      return f'it lacks {lacking} instances its pages gave'
    counts = self._series_counts(patient_id)
    listed = collections.Counter(instance.series for instance in found.values())
    short = {s: n for s, n in counts.items() if n > listed.get(s, 0)}
    if not short:
      return None
    return (
      f'its series hold {sum(short.values())} instances and it lists '
      f'{sum(listed[s] for s in short)} of them'
    )

  def _series_counts(self, patient_id: str) -> dict[str, int]:
    """{series UID: NumberOfSeriesRelatedInstances} of the patient's series,
    for those the server counts ({} if it counts none or refuses)."""
    try:
      items, _ = self._search(
        'series',
        [('PatientID', patient_id), ('includefield', SERIES_INSTANCE_COUNT)],
        f'QIDO-RS series search for PatientID {patient_id}',
      )
    except DicomWebError:
      return {}
    counts = {}
    for item in items:
      if isinstance(item, dict):
        count = _value(item, SERIES_INSTANCE_COUNT)
        if count.isascii() and count.isdigit() and _value(item, SERIES_UID):
          counts[_value(item, SERIES_UID)] = int(count)
    return counts

  def retrieve(self, path: str, limit: int | None = None) -> bytes:
    """The instance at ``path`` (an Instance.path) as stored on the server; a
    body that breaks off or is cut short is retrieved again.

    Raises:
      DicomWebError: the server refused or failed (with its status).
      FileTooLargeError: it holds more than ``limit`` bytes.
    """
    envelope = None if limit is None else limit + _ENVELOPE_BYTES

    def parse(status, headers, body):
      if status != 200:
        return None
      return _single_part(body, headers.get('Content-Type', ''))

    try:
      status, _, data = self._get(quote(path), _ACCEPT_DICOM, envelope, parse)
    except _Oversized as e:
      raise _too_large(e.size, limit) from None
    if status != 200:
      raise self._failed(status, 'WADO-RS retrieve')
    if limit is not None and len(data) > limit:
      raise _too_large(len(data), limit)
    return data

  def open_series(self, series: str):
    """(read, content type, close) of the WADO-RS retrieve of a whole
    series (``studies/{uid}/series/{uid}``), its body not yet read: read(n)
    gives up to n bytes more (b'' at the end) and raises http.BodyError if
    the body breaks off; close() lets the connection go. (A body that
    breaks off is asked for again by its reader, transforms.decode.series.)

    Raises:
      DicomWebError: no answer, or the server refused (with its status).
    """
    status, response = self._exchange(quote(series), _ACCEPT_DICOM, lambda r: r)
    if status != 200:
      response.close()
      response.release_conn()
      raise self._failed(status, 'WADO-RS series retrieve')

    def close():
      response.close()
      response.release_conn()

    return http.reader(response), response.headers.get('Content-Type', ''), close


class _Oversized(Exception):
  def __init__(self, size: int):
    super().__init__(size)
    self.size = size


def _too_large(size: int, limit: int) -> FileTooLargeError:
  return FileTooLargeError(
    f'instance of {size} bytes is larger than --max-file-bytes {limit}; not read'
  )


def client(config: DicomWebConfig) -> DicomWebClient:
  """This process's client for ``config`` and the credentials it finds now
  (its pool is shared by threads and reused by later calls).

  Raises:
    UsageError: see auth_headers.
  """
  return _client(config, tuple(auth_headers(config).items()))


@functools.lru_cache(maxsize=4)
def _client(config: DicomWebConfig, headers: tuple) -> DicomWebClient:
  return DicomWebClient(config, dict(headers))
