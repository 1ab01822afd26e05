"""DICOMweb: QIDO-RS searches and WADO-RS retrieves from a PACS.

One :class:`DicomWebClient` per worker process (``client()``), on one pooled
urllib3 connection pool with bounded connections, retries with backoff and
jitter (``http.http_pool``). An instance is retrieved as it is stored
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

import dataclasses
import email.message
import fnmatch
import functools
import json
import os
import re
import stat
from collections.abc import Iterator
from typing import NamedTuple
from urllib.parse import quote, urlencode, urlsplit

from transforms.contract.errors import FileTooLargeError, UsageError
from transforms.io import http

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
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    raise UsageError(f'--dicomweb-auth-file {path}: {e.strerror or e}') from None
  if mode & stat.S_IROTH:
    raise UsageError(
      f'--dicomweb-auth-file {path} is readable by every user: chmod o-r it'
    )
  try:
    with open(path, encoding='utf-8') as f:
      credentials = json.load(f)
  except OSError as e:
    raise UsageError(f'--dicomweb-auth-file {path}: {e.strerror or e}') from None
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
    raise DicomWebError('the server sent a malformed multipart answer')
  head = email.message_from_bytes(body[start + len(delimiter) : head_end].lstrip())
  content = head_end + 4
  length = (head.get('Content-Length') or '').strip()
  if length.isdigit():  # exact, even if the content holds the boundary
    end = content + int(length)
    if not body.startswith(b'\r\n' + delimiter, end):
      raise DicomWebError('the server sent a truncated multipart answer')
  else:
    end = body.find(b'\r\n' + delimiter, content)
  if end < 0:
    raise DicomWebError('the server sent a truncated multipart answer')
  if head.get_content_type() != 'application/dicom':
    raise DicomWebError(f'the server sent a {head.get_content_type()} part')
  if not body.startswith(b'--', end + 2 + len(delimiter)):
    raise DicomWebError('the server sent more than one instance for one instance')
  return body[content:end]


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
    self._attempts = config.attempts
    self._pool = http.http_pool(config.concurrency, config.attempts, tls)

  def _get(self, relative: str, accept: str, limit: int | None = None):
    """(status, content type, body) of a GET below the service root; the body
    is not read past ``limit`` bytes.

    Raises:
      DicomWebError: no answer after the retries.
      _Oversized: the body holds more than ``limit`` bytes.
    """
    response = self._send(relative, accept)
    try:
      declared = response.headers.get('Content-Length') or ''
      size = int(declared) if declared.isdigit() else 0
      if limit is not None and size > limit:
        response.close()  # not worth draining: the connection is dropped
        raise _Oversized(size)
      body = response.read(None if limit is None else limit + 1)
      if limit is not None and len(body) > limit:
        response.close()
        raise _Oversized(len(body))
      return response.status, response.headers.get('Content-Type', ''), body
    finally:
      response.release_conn()

  def _send(self, relative: str, accept: str):
    """The response to a GET below the service root, its body not read.

    Raises:
      DicomWebError: no answer after the retries.
    """
    try:
      return self._pool.request(
        'GET',
        f'{self._root}/{relative}',
        headers={**self._headers, 'Accept': accept},
        preload_content=False,
      )
    except Exception as e:  # urllib3's, after its retries; it names no secret
      reason = getattr(e, 'reason', None) or e
      raise DicomWebError(
        f'no answer from the server after {self._attempts} attempts: {reason}'
      ) from None

  def _failed(self, status: int, what: str) -> DicomWebError:
    from http import HTTPStatus

    try:
      phrase = HTTPStatus(status).phrase
    except ValueError:
      phrase = ''
    retried = (
      f' after {self._attempts} attempts' if status in http.RETRIED_STATUSES else ''
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

  def search(self, patient_id: str) -> Iterator[Instance]:
    """Every instance whose PatientID is ``patient_id``, page by page
    (limit/offset) until a page adds nothing new.

    Raises:
      DicomWebError: a page could not be had.
    """
    seen: set[str] = set()
    offset = 0
    while True:
      query = urlencode(
        [('PatientID', patient_id)]
        + [('includefield', tag) for tag in _INCLUDED]
        + [('limit', self._page_size), ('offset', offset)]
      )
      try:
        status, _, body = self._get(
          f'instances?{query}', 'application/dicom+json', _MAX_PAGE_BYTES
        )
      except _Oversized as e:
        raise DicomWebError(f'a search page of over {e.size} bytes') from None
      if status == 204:
        return
      if status != 200:
        raise self._failed(status, f'QIDO-RS search for PatientID {patient_id}')
      try:
        page = json.loads(body) if body.strip() else []
      except ValueError:
        raise DicomWebError(
          'the server sent a search answer that is not JSON'
        ) from None
      if not isinstance(page, list):
        raise DicomWebError('the server sent a search page that is not a list')
      new = [instance_of(item) for item in page if isinstance(item, dict)]
      new = [instance for instance in new if instance.sop not in seen]
      if not new:
        return
      for instance in new:
        seen.add(instance.sop)
        if instance.patient_id in (None, patient_id):  # not a looser match
          yield instance
      offset += len(page)

  def retrieve(self, path: str, limit: int | None = None) -> bytes:
    """The instance at ``path`` (an Instance.path) as stored on the server.

    Raises:
      DicomWebError: the server refused or failed (with its status).
      FileTooLargeError: it holds more than ``limit`` bytes.
    """
    envelope = None if limit is None else limit + _ENVELOPE_BYTES
    try:
      status, content_type, body = self._get(quote(path), _ACCEPT_DICOM, envelope)
    except _Oversized as e:
      raise _too_large(e.size, limit) from None
    if status != 200:
      raise self._failed(status, 'WADO-RS retrieve')
    data = _single_part(body, content_type)
    if limit is not None and len(data) > limit:
      raise _too_large(len(data), limit)
    return data

  def open_series(self, series: str):
    """(read, content type, close) of the WADO-RS retrieve of a whole
    series (``studies/{uid}/series/{uid}``), its body not yet read: read(n)
    gives up to n bytes more (b'' at the end); close() lets the connection go.

    Raises:
      DicomWebError: no answer, or the server refused (with its status).
    """
    response = self._send(quote(series), _ACCEPT_DICOM)
    if response.status != 200:
      response.close()
      raise self._failed(response.status, 'WADO-RS series retrieve')

    def close():
      response.close()
      response.release_conn()

    return response.read, response.headers.get('Content-Type', ''), close


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
