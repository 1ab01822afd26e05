"""Files on a local disk, S3 or GCS, through one small interface.

Beam's own S3 and GCS file systems build a new client for every call
(``s3io.S3IO(options)`` per open: about 150 ms of CPU each), so the hot paths
here use the vendors' clients directly, built once per worker process and
shared by its threads:

- ``s3://``: boto3, measured fastest against an S3-compatible server
  (BENCHMARKS.md): 276 objects/s with 8 threads against 114-158 for
  pyarrow.fs, which sends a HEAD before every GET. The GETs of the hot path
  are signed with botocore's signer and sent through urllib3 (_SignedGets);
  the rest uses the boto3 client, whose ``standard`` retry mode retries
  throttling (503 SlowDown, 429) and transient errors (5xx, dropped
  connections) with exponential backoff and full jitter, capped at 20 s a
  wait, up to ``StoreConfig.attempts`` attempts.
- ``gs://``: google-cloud-storage, whose default retry does the same for 429
  and 5xx (exponential, jittered, 120 s in all).

Credentials are never options: boto3 and google-auth find them on each
machine (environment variables, profiles, instance roles). ``s3://`` takes
its endpoint and region from Beam's standard ``--s3_endpoint_url`` and
``--s3_region_name``; ``gs://`` honours ``STORAGE_EMULATOR_HOST``.

Object stores have no rename and no folders: ``copy`` is a server-side copy,
a "folder" is a key prefix, and ``create_exclusive`` is a conditional create
(S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

DEFAULT_READ_CONCURRENCY = 32
DEFAULT_ATTEMPTS = 8
# Connections each client's pool keeps beyond --read-concurrency (the
# requests in flight a worker allows).
SPARE_CONNECTIONS = 8
PART_SIZE = 8 * 1024 * 1024  # multipart upload parts (S3's minimum is 5 MiB)
_READ_STEP = 8 * 1024 * 1024


def is_local(path: str) -> bool:
  """True for a path on the local disk (no ``scheme://``)."""
  return '://' not in path


@dataclasses.dataclass(frozen=True)
class StoreConfig:
  """How to reach object stores; pickled to every worker with the stages.

  Holds no credentials (see the module docstring).

  Attributes:
    s3_endpoint_url: an S3-compatible endpoint (None: AWS).
    s3_region: the S3 region (None: boto3's default chain).
    s3_verify: verify TLS certificates (a CA bundle path, or False).
    read_concurrency: requests in flight per worker while reading files.
    attempts: tries per request before a file counts as failed.
  """

  s3_endpoint_url: str | None = None
  s3_region: str | None = None
  s3_verify: bool | str | None = None
  read_concurrency: int = DEFAULT_READ_CONCURRENCY
  attempts: int = DEFAULT_ATTEMPTS


class AppendOnlyFile:
  """The file protocol a Parquet writer asks of a sink that only appends:
  not readable, not seekable, ``tell()`` is the bytes written (``size``)."""

  size = 0
  closed = False

  def writable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return False

  def readable(self) -> bool:
    return False

  def tell(self) -> int:
    return self.size


class Store(Protocol):
  """What the pipeline asks of a file system; paths are full paths/URLs."""

  def read(self, path: str, limit: int | None = None) -> bytes:
    """At most ``limit + 1`` bytes of the file (all of it without a limit).
    Raises FileNotFoundError, or OSError naming the cause."""

  def files(self, prefix: str) -> Iterator[str]:
    """Every file under the folder ``prefix``, at any depth, paged."""

  def level(self, prefix: str) -> tuple[list[str], list[str]]:
    """(files, sub-folders) directly in the folder ``prefix``."""

  def create(self, path: str) -> AppendOnlyFile:
    """A new file written as it goes (multipart on object stores)."""

  def create_exclusive(self, path: str, data: bytes) -> bool:
    """Writes ``data`` only if ``path`` does not exist; False if it did."""

  def exists(self, path: str) -> bool: ...

  def copy(self, source: str, target: str) -> None: ...

  def delete(self, paths: Iterable[str]) -> None:
    """Deletes files; missing ones are ignored."""


def _read_capped(f, limit: int) -> bytes:
  """At most ``limit + 1`` bytes of ``f``, in steps: ``read(limit + 1)``
  would allocate the whole limit up front, whatever the file's size."""
  parts, total = [], 0
  while total <= limit and (part := f.read(min(_READ_STEP, limit + 1 - total))):
    parts.append(part)
    total += len(part)
  return b''.join(parts)


class _LocalFile(AppendOnlyFile):
  def __init__(self, path: str):
    self._f = open(path, 'wb')  # noqa: SIM115 (closed by close())

  def write(self, data) -> int:
    self.size += len(memoryview(data).cast('B'))
    return self._f.write(data)

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self.closed = True
    self._f.close()


class LocalStore:
  """A local or mounted disk."""

  def read(self, path, limit=None):
    with open(path, 'rb') as f:
      return f.read() if limit is None else _read_capped(f, limit)

  def files(self, prefix):
    for folder, _, names in os.walk(prefix):
      for name in sorted(names):
        yield os.path.join(folder, name)

  def level(self, prefix):
    files, folders = [], []
    for entry in sorted(os.scandir(prefix), key=lambda e: e.name):
      (folders if entry.is_dir(follow_symlinks=False) else files).append(entry.path)
    return files, folders

  def create(self, path):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    return _LocalFile(path)

  def create_exclusive(self, path, data):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    return True

  def exists(self, path):
    return os.path.exists(path)

  def copy(self, source, target):
    os.makedirs(os.path.dirname(target) or '.', exist_ok=True)
    shutil.copyfile(source, target)

  def delete(self, paths):
    for path in paths:
      with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        else:
          os.remove(path)


def _split(path: str) -> tuple[str, str]:
  """``scheme://bucket/key`` -> (bucket, key)."""
  bucket, _, key = path.split('://', 1)[1].partition('/')
  return bucket, key


def _folder_key(prefix: str) -> str:
  key = _split(prefix)[1]
  return key.rstrip('/') + '/' if key else ''


class _S3Upload(AppendOnlyFile):
  """An object uploaded in ``PART_SIZE`` parts as it is written; only the
  part being filled is held. A file smaller than one part is one PUT."""

  def __init__(self, client, bucket: str, key: str):
    self._client, self._bucket, self._key = client, bucket, key
    self._buffer = bytearray()
    self._upload_id: str | None = None
    self._parts: list[dict] = []

  def write(self, data) -> int:
    view = memoryview(data).cast('B')
    self._buffer += view
    self.size += len(view)
    while len(self._buffer) >= PART_SIZE:
      self._upload(bytes(self._buffer[:PART_SIZE]))
      del self._buffer[:PART_SIZE]
    return len(view)

  def flush(self) -> None:
    pass

  def _upload(self, part: bytes) -> None:
    try:
      if self._upload_id is None:
        created = self._client.create_multipart_upload(
          Bucket=self._bucket, Key=self._key
        )
        self._upload_id = created['UploadId']
      number = len(self._parts) + 1
      done = self._client.upload_part(
        Bucket=self._bucket,
        Key=self._key,
        UploadId=self._upload_id,
        PartNumber=number,
        Body=part,
      )
    except Exception as e:
      self.abort()
      raise _os_error(e, f's3://{self._bucket}/{self._key}') from e
    self._parts.append({'ETag': done['ETag'], 'PartNumber': number})

  def abort(self) -> None:
    """Drops an unfinished multipart upload (its parts cost storage)."""
    if self._upload_id is not None:
      with contextlib.suppress(Exception):
        self._client.abort_multipart_upload(
          Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
        )
      self._upload_id = None

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    path = f's3://{self._bucket}/{self._key}'
    if self._upload_id is None:
      try:
        self._client.put_object(
          Bucket=self._bucket, Key=self._key, Body=bytes(self._buffer)
        )
      except Exception as e:
        raise _os_error(e, path) from e
      return
    if self._buffer:
      self._upload(bytes(self._buffer))
    self._buffer = bytearray()
    try:
      self._client.complete_multipart_upload(
        Bucket=self._bucket,
        Key=self._key,
        UploadId=self._upload_id,
        MultipartUpload={'Parts': self._parts},
      )
    except Exception as e:
      self.abort()
      raise _os_error(e, path) from e


def _os_error(e: Exception, path: str) -> OSError:
  """An OSError for a failed request: FileNotFoundError for a missing key,
  otherwise the HTTP status and the service's error code."""
  if isinstance(e, OSError):
    return e
  response = getattr(e, 'response', None)
  if isinstance(response, dict):  # botocore ClientError
    code = response.get('Error', {}).get('Code', '')
    status = response.get('ResponseMetadata', {}).get('HTTPStatusCode')
    if code in ('NoSuchKey', '404', 'NotFound'):
      return FileNotFoundError(2, 'no such object', path)
    return OSError(f'{path}: HTTP {status} {code}'.strip())
  status = getattr(e, 'code', None)  # google.api_core exceptions
  if status == 404:
    return FileNotFoundError(2, 'no such object', path)
  reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  prefix = f'HTTP {status} ' if isinstance(status, int) else ''
  return OSError(f'{path}: {prefix}{type(e).__name__}: {reason}')


RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})


def http_pool(concurrency: int, attempts: int, tls: dict):
  """A urllib3 pool for a worker's hot-path GETs: ``concurrency`` (plus a
  few) pooled connections, ``attempts`` tries of each request on connection
  errors and on throttling and transient statuses (RETRIED_STATUSES, honouring
  Retry-After), exponential backoff from 0.1 s doubling to at most 20 s plus
  up to 0.5 s of jitter. ``tls``: urllib3's cert_reqs/ca_certs arguments."""
  import urllib3

  return urllib3.PoolManager(
    maxsize=concurrency + SPARE_CONNECTIONS,
    timeout=urllib3.Timeout(connect=10, read=60),
    retries=urllib3.Retry(
      total=attempts - 1,
      status_forcelist=RETRIED_STATUSES,
      allowed_methods={'GET'},
      backoff_factor=0.1,
      backoff_max=20,
      backoff_jitter=0.5,
      raise_on_status=False,
      respect_retry_after_header=True,
    ),
    **tls,
  )


class _SignedGets:
  """GETs of S3 objects, signed with botocore's SigV4 signer and sent through
  one urllib3 connection pool: the hot path of a run.

  A boto3 ``get_object`` costs about 3.4 ms of CPU per object in botocore's
  event, parsing and checksum machinery; this costs 1.8 ms (BENCHMARKS.md),
  and the saving is GIL time the decoding thread gets back. Everything else
  (listing, uploads, copies, deletes) goes through the boto3 client. The
  client's resolved endpoint, region and credential chain (refreshed per
  request) are used, so the two paths reach the same store as the same user.
  Retries are urllib3's: throttling and transient statuses (429, 500, 502,
  503, 504) and connection errors, exponential backoff (0.1 s doubling, at
  most 20 s) plus up to 0.5 s of jitter.
  """

  def __init__(self, client, credentials, config: StoreConfig):
    from botocore.httpsession import get_cert_path

    self._endpoint = client.meta.endpoint_url.rstrip('/')
    self._region = client.meta.region_name or 'us-east-1'
    self._path_style = config.s3_endpoint_url is not None
    self._credentials = credentials
    verify = config.s3_verify
    tls = (
      {'cert_reqs': 'CERT_NONE'}
      if verify is False
      else {'cert_reqs': 'CERT_REQUIRED', 'ca_certs': get_cert_path(verify or True)}
    )
    self._pool = http_pool(config.read_concurrency, config.attempts, tls)

  def _url(self, bucket: str, key: str) -> str:
    from urllib.parse import quote

    quoted = quote(key, safe='/~')
    if self._path_style or '.' in bucket:
      return f'{self._endpoint}/{bucket}/{quoted}'
    scheme, host = self._endpoint.split('://', 1)
    return f'{scheme}://{bucket}.{host}/{quoted}'

  def get(self, path: str, limit: int | None) -> bytes:
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest

    url = self._url(*_split(path))
    headers = {'x-amz-content-sha256': 'UNSIGNED-PAYLOAD'}
    if limit is not None:  # at most limit + 1 bytes ever arrive
      headers['Range'] = f'bytes=0-{limit}'
    request = AWSRequest(method='GET', url=url, headers=headers)
    if self._credentials is not None:
      frozen = self._credentials.get_frozen_credentials()
      S3SigV4Auth(frozen, 's3', self._region).add_auth(request)
    try:
      response = self._pool.request(
        'GET', url, headers=dict(request.headers.items()), preload_content=True
      )
    except Exception as e:  # urllib3's, after its retries
      raise OSError(f'{path}: {type(e).__name__}: {e}') from e
    if response.status in (200, 206):
      return response.data
    if response.status == 416:  # a range on an empty object
      return b''
    code = _xml_code(response.data)
    if response.status == 404 or code == 'NoSuchKey':
      raise FileNotFoundError(2, 'no such object', path)
    raise OSError(f'{path}: HTTP {response.status} {code}'.strip())


def _xml_code(body: bytes) -> str:
  """The ``<Code>`` of an S3 error body, or ''."""
  start = body.find(b'<Code>')
  end = body.find(b'</Code>', start)
  return body[start + 6 : end].decode('utf-8', 'replace') if 0 <= start < end else ''


class S3Store:
  """S3 and S3-compatible servers, through one boto3 client (and its
  signer and credentials for the GETs, see _SignedGets)."""

  def __init__(self, config: StoreConfig):
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    self._client = session.client(
      's3',
      endpoint_url=config.s3_endpoint_url,
      region_name=config.s3_region,
      verify=config.s3_verify,
      config=Config(
        max_pool_connections=config.read_concurrency + SPARE_CONNECTIONS,
        retries={'mode': 'standard', 'total_max_attempts': config.attempts},
        connect_timeout=10,
        read_timeout=60,
      ),
    )
    self._gets = _SignedGets(self._client, session.get_credentials(), config)

  def read(self, path, limit=None):
    return self._gets.get(path, limit)

  def _pages(self, prefix: str, delimiter: str | None):
    bucket = _split(prefix)[0]
    arguments = {'Bucket': bucket, 'Prefix': _folder_key(prefix)}
    if delimiter:
      arguments['Delimiter'] = delimiter
    try:
      yield from self._client.get_paginator('list_objects_v2').paginate(**arguments)
    except Exception as e:
      raise _os_error(e, prefix) from e

  def files(self, prefix):
    bucket = _split(prefix)[0]
    for page in self._pages(prefix, None):
      for item in page.get('Contents', ()):
        yield f's3://{bucket}/{item["Key"]}'

  def level(self, prefix):
    bucket = _split(prefix)[0]
    files, folders = [], []
    for page in self._pages(prefix, '/'):
      files += [f's3://{bucket}/{o["Key"]}' for o in page.get('Contents', ())]
      folders += [
        f's3://{bucket}/{p["Prefix"].rstrip("/")}'
        for p in page.get('CommonPrefixes', ())
      ]
    return files, folders

  def create(self, path):
    return _S3Upload(self._client, *_split(path))

  def create_exclusive(self, path, data):
    bucket, key = _split(path)
    try:
      self._client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch='*')
    except Exception as e:
      status = getattr(e, 'response', {}).get('ResponseMetadata', {})
      if status.get('HTTPStatusCode') in (409, 412):
        return False
      raise _os_error(e, path) from e
    return True

  def exists(self, path):
    bucket, key = _split(path)
    try:
      self._client.head_object(Bucket=bucket, Key=key)
    except Exception as e:
      error = _os_error(e, path)
      if isinstance(error, FileNotFoundError):
        return False
      raise error from e
    return True

  def copy(self, source, target):
    bucket, key = _split(source)
    to_bucket, to_key = _split(target)
    try:
      self._client.copy_object(
        Bucket=to_bucket, Key=to_key, CopySource={'Bucket': bucket, 'Key': key}
      )
    except Exception as e:
      raise _os_error(e, source) from e

  def delete(self, paths):
    by_bucket: dict[str, list[str]] = {}
    for path in paths:
      bucket, key = _split(path)
      by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
      for start in range(0, len(keys), 1000):  # S3's batch limit
        batch = [{'Key': k} for k in keys[start : start + 1000]]
        try:
          self._client.delete_objects(Bucket=bucket, Delete={'Objects': batch})
        except Exception as e:
          raise _os_error(e, f's3://{bucket}') from e


class _GcsUpload(AppendOnlyFile):
  """A GCS object written through a resumable upload, in ``PART_SIZE``
  chunks as it is written."""

  def __init__(self, blob, path: str):
    self._path = path
    self._writer = blob.open('wb', chunk_size=PART_SIZE, ignore_flush=True)

  def write(self, data) -> int:
    view = memoryview(data).cast('B')
    try:
      self._writer.write(view)
    except Exception as e:
      raise _os_error(e, self._path) from e
    self.size += len(view)
    return len(view)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    if not self.closed:
      self.closed = True
      try:
        self._writer.close()
      except Exception as e:
        raise _os_error(e, self._path) from e


class GcsStore:
  """Google Cloud Storage (or an emulator at ``STORAGE_EMULATOR_HOST``),
  through one google-cloud-storage client."""

  def __init__(self, config: StoreConfig):
    import requests.adapters
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
      self._client = storage.Client()
    except (DefaultCredentialsError, OSError):  # public buckets still work
      self._client = storage.Client.create_anonymous_client()
    # requests keeps 10 connections per host by default: one per read in
    # flight instead, or every read past the tenth opens a new connection.
    adapter = requests.adapters.HTTPAdapter(
      pool_connections=4, pool_maxsize=config.read_concurrency + SPARE_CONNECTIONS
    )
    self._client._http.mount('https://', adapter)
    self._client._http.mount('http://', adapter)

  def _blob(self, path: str):
    bucket, key = _split(path)
    return self._client.bucket(bucket).blob(key)

  def read(self, path, limit=None):
    try:
      # A ranged read: at most limit + 1 bytes ever arrive.
      return self._blob(path).download_as_bytes(
        end=None if limit is None else limit, checksum=None
      )
    except Exception as e:
      if getattr(e, 'code', None) == 416:  # a range on an empty object
        return b''
      raise _os_error(e, path) from e

  def _listing(self, prefix: str, delimiter: str | None):
    bucket = _split(prefix)[0]
    return self._client.list_blobs(
      bucket, prefix=_folder_key(prefix), delimiter=delimiter
    )

  def files(self, prefix):
    bucket = _split(prefix)[0]
    try:
      for blob in self._listing(prefix, None):
        yield f'gs://{bucket}/{blob.name}'
    except Exception as e:
      raise _os_error(e, prefix) from e

  def level(self, prefix):
    bucket = _split(prefix)[0]
    try:
      listing = self._listing(prefix, '/')
      files = [f'gs://{bucket}/{blob.name}' for blob in listing]
      folders = [f'gs://{bucket}/{p.rstrip("/")}' for p in sorted(listing.prefixes)]
    except Exception as e:
      raise _os_error(e, prefix) from e
    return files, folders

  def create(self, path):
    return _GcsUpload(self._blob(path), path)

  def create_exclusive(self, path, data):
    try:
      self._blob(path).upload_from_string(data, if_generation_match=0)
    except Exception as e:
      if getattr(e, 'code', None) == 412:
        return False
      raise _os_error(e, path) from e
    return True

  def exists(self, path):
    try:
      return self._blob(path).exists()
    except Exception as e:
      raise _os_error(e, path) from e

  def copy(self, source, target):
    bucket, key = _split(source)
    to_bucket, to_key = _split(target)
    try:
      self._client.bucket(bucket).copy_blob(
        self._client.bucket(bucket).blob(key), self._client.bucket(to_bucket), to_key
      )
    except Exception as e:
      raise _os_error(e, source) from e

  def delete(self, paths):
    for path in paths:
      try:
        self._blob(path).delete()
      except Exception as e:
        error = _os_error(e, path)
        if not isinstance(error, FileNotFoundError):
          raise error from e


_CONFIG = StoreConfig()
_STORES: dict[str, Store] = {}
_LOCK = threading.Lock()
_LOCAL = LocalStore()


# scheme -> (store, what to install for it)
_KINDS = {
  's3': (S3Store, "boto3 (pip install 'apache-beam[aws]')"),
  'gs': (GcsStore, "google-cloud-storage (pip install 'apache-beam[gcp]')"),
}


def configure(config: StoreConfig) -> None:
  """Sets this process's store configuration (each stage calls it on its
  worker with the configuration it was given); clients built for another
  configuration are dropped."""
  global _CONFIG
  with _LOCK:
    if config != _CONFIG:
      _CONFIG = config
      _STORES.clear()


def store(path: str) -> Store:
  """The store holding ``path``; one client per scheme and process."""
  if is_local(path):
    return _LOCAL
  scheme = path.split('://', 1)[0]
  with _LOCK:
    found = _STORES.get(scheme)
    if found is None:
      kind, package = _KINDS.get(scheme, (None, None))
      if kind is None:
        raise OSError(f'{path}: no store for {scheme}:// (local, s3://, gs://)')
      try:
        found = kind(_CONFIG)
      except ImportError as e:
        raise OSError(f'{path}: {scheme}:// needs {package}: {e}') from e
      _STORES[scheme] = found
    return found


def join(root: str, *relative: str) -> str:
  """``root`` joined with ``/``-separated parts (local: os.path.join)."""
  parts = [p for r in relative for p in r.split('/') if p]
  if is_local(root):
    return os.path.join(root, *parts)
  return '/'.join([root.rstrip('/'), *parts])


def files_under(path: str) -> list[str]:
  """Every file below the folder (or object-store prefix) ``path``."""
  if is_local(path) and not os.path.isdir(path):
    return []
  return list(store(path).files(path))


def exists(path: str) -> bool:
  """True for a file, a folder, or an object-store prefix holding objects."""
  found = store(path)
  if found.exists(path):
    return True
  return not is_local(path) and next(iter(found.files(path)), None) is not None


def delete_tree(path: str) -> None:
  """Deletes a file or a folder; on object stores, every object under it."""
  found = store(path)
  found.delete([path] if is_local(path) else [*found.files(path), path])


def move_all(pairs: list[tuple[str, str]]) -> None:
  """Moves (source, target) files: renames on a local disk; parallel
  server-side copies, then one batch of deletes, on an object store."""
  local = [pair for pair in pairs if is_local(pair[0])]
  for source, target in local:
    os.makedirs(os.path.dirname(target) or '.', exist_ok=True)
    os.replace(source, target)
  remote = [pair for pair in pairs if not is_local(pair[0])]
  if remote:
    copy_all(remote)
    store(remote[0][0]).delete([source for source, _ in remote])


def read_bytes(path: str) -> bytes:
  return store(path).read(path)


def write_bytes(path: str, data: bytes) -> None:
  f = store(path).create(path)
  f.write(data)
  f.close()


def copy_all(pairs: list[tuple[str, str]], concurrency: int | None = None) -> None:
  """Copies (source, target) pairs, ``concurrency`` at a time (server-side
  copies on object stores)."""
  if not pairs:
    return
  workers = concurrency or _CONFIG.read_concurrency
  with ThreadPoolExecutor(max(1, min(workers, len(pairs)))) as pool:
    for done in pool.map(lambda pair: store(pair[0]).copy(*pair), pairs):
      del done


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
