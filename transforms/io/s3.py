"""``s3://`` through obstore (Rust ``object_store``), one client per bucket and
worker process, shared by its threads.

obstore sends the requests: the GETs of the hot path (half the client CPU
of a botocore-signed GET, which is GIL time the decoding thread gets back;
BENCHMARKS.md), uploads (multipart once a file outgrows one part), the
conditional create (``If-None-Match: *``), copies and deletes. Its retries
cover throttling (429, 503 SlowDown), 5xx answers, dropped connections and
timeouts, with exponential backoff from 0.1 s to at most 20 s and jitter,
``StoreConfig.attempts`` tries in all.

Listing stays with boto3's paginator: ``object_store`` refuses a whole
listing when one key holds a ``.`` or ``..`` segment, an empty segment
(``a//b``) or a control character, and a data tree may hold such a key
(the listing reports it; nothing else in the folder is lost).

Credentials are boto3's chain (environment, profiles, SSO, container and
instance roles), so both clients act as the same user; with none found,
requests go unsigned (public buckets). The endpoint and region come from
Beam's standard ``--s3_endpoint_url`` and ``--s3_region_name``.
"""

from __future__ import annotations

import datetime
import io
import re
import threading

from transforms.io.protocol import (
  PART_SIZE,
  SPARE_CONNECTIONS,
  AppendOnlyFile,
  StoreConfig,
  bucket_key,
  folder_key,
  os_error,
)

_STATUS = re.compile(r'status code: (\d{3})')
_CODE = re.compile(r'<Code>([^<]{1,64})</Code>')
_URL = re.compile(r'\bhttps?://\S+')

# Parts an upload sends at once while the next one fills (each PART_SIZE).
_UPLOADS_IN_FLIGHT = 2


def _error(e: Exception, path: str) -> OSError:
  """An OSError for a failed obstore request, in the words of the rest of
  the house: FileNotFoundError for a missing key, else ``HTTP <status>
  <code>`` or the kind of failure. obstore's own text names the request's
  URL (the real key) and is not passed on."""
  if isinstance(e, FileNotFoundError):  # obstore's NotFoundError is one
    return FileNotFoundError(2, 'no such object', path)
  text = str(e)
  status = _status(e)
  if status is not None:
    code = _CODE.search(text)
    return OSError(f'{path}: HTTP {status} {code[1] if code else ""}'.strip())
  reason = _URL.sub('<request>', text.strip().splitlines()[0] if text.strip() else '')
  return OSError(f'{path}: {type(e).__name__}: {reason}'.rstrip(': '))


def _status(e: Exception) -> int | None:
  found = _STATUS.search(str(e))
  return int(found[1]) if found else None


class _Upload(AppendOnlyFile):
  """An object written as it goes: one PUT for a file smaller than a part,
  else a multipart upload holding at most the part being filled and
  ``_UPLOADS_IN_FLIGHT`` parts on their way."""

  def __init__(self, bucket, key: str, path: str):
    import obstore

    self._path = path
    self._writer = obstore.open_writer(
      bucket, key, buffer_size=PART_SIZE, max_concurrency=_UPLOADS_IN_FLIGHT
    )

  def write(self, data) -> int:
    view = memoryview(data).cast('B')
    try:
      self._writer.write(view)
    except Exception as e:
      raise _error(e, self._path) from e
    self.size += len(view)
    return len(view)

  def flush(self) -> None:
    pass

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    try:
      self._writer.close()
    except Exception as e:
      raise _error(e, self._path) from e


class S3Store:
  """S3 and S3-compatible servers: obstore for objects, boto3 for listing."""

  def __init__(self, config: StoreConfig):
    import boto3
    from botocore.config import Config

    self._config = config
    session = boto3.session.Session(region_name=config.s3_region)
    self._session = session
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
    self._region = config.s3_region or session.region_name or 'us-east-1'
    self._buckets: dict[str, object] = {}
    self._lock = threading.Lock()

  def _bucket(self, name: str):
    """The obstore client of a bucket, made on first use."""
    with self._lock:
      found = self._buckets.get(name)
      if found is None:
        found = self._buckets[name] = self._open(name)
      return found

  def _open(self, name: str):
    from botocore.credentials import RefreshableCredentials
    from obstore.store import S3Store as ObjectStore

    config = self._config
    client = {
      'pool_max_idle_per_host': str(config.read_concurrency + SPARE_CONNECTIONS),
      'connect_timeout': datetime.timedelta(seconds=10),
      'read_timeout': datetime.timedelta(seconds=60),
      'timeout': datetime.timedelta(hours=1),  # a large object's whole GET
    }
    settings: dict = {'region': self._region}
    endpoint = config.s3_endpoint_url
    if endpoint:
      settings['endpoint'] = endpoint
      client['allow_http'] = endpoint.startswith('http://')
    else:
      settings['virtual_hosted_style_request'] = '.' not in name
    if config.s3_verify is False:
      client['allow_invalid_certificates'] = True
    elif isinstance(config.s3_verify, str):
      with open(config.s3_verify, 'rb') as f:
        client['root_certificate'] = f.read()
    provider = None
    credentials = self._session.get_credentials()
    if credentials is None:
      settings['skip_signature'] = True
    elif isinstance(credentials, RefreshableCredentials):
      from obstore.auth.boto3 import Boto3CredentialProvider

      # Temporary credentials (roles, SSO): botocore refreshes them well
      # before they expire; asked every 5 minutes, obstore never signs with
      # stale ones.
      provider = Boto3CredentialProvider(
        self._session, ttl=datetime.timedelta(minutes=5)
      )
    else:  # keys that never change: signing never calls back into Python
      frozen = credentials.get_frozen_credentials()
      settings['access_key_id'] = frozen.access_key
      settings['secret_access_key'] = frozen.secret_key
      if frozen.token:
        settings['session_token'] = frozen.token
    return ObjectStore(
      name,
      config=settings,
      client_options=client,
      retry_config={
        'max_retries': max(0, config.attempts - 1),
        'backoff': {
          'init_backoff': datetime.timedelta(milliseconds=100),
          'max_backoff': datetime.timedelta(seconds=20),
          'base': 2,
        },
      },
      credential_provider=provider,
    )

  def table_options(self) -> dict[str, str]:
    """The endpoint, region and credentials as object_store options, for
    deltalake's own client (the Delta commits): the same session chain as
    every other request. Commits are conditional puts (If-None-Match), so
    two writers never both make one version."""
    from botocore.credentials import RefreshableCredentials

    config = self._config
    options = {'aws_region': self._region, 'aws_conditional_put': 'etag'}
    if config.s3_endpoint_url:
      options['aws_endpoint_url'] = config.s3_endpoint_url
      options['aws_allow_http'] = str(config.s3_endpoint_url.startswith('http://'))
    if config.s3_verify is False:
      options['allow_invalid_certificates'] = 'true'
    credentials = self._session.get_credentials()
    if credentials is None:
      options['aws_skip_signature'] = 'true'
      return options
    if isinstance(credentials, RefreshableCredentials):
      credentials.get_frozen_credentials()  # refreshed now if close to expiry
    frozen = credentials.get_frozen_credentials()
    options['aws_access_key_id'] = frozen.access_key
    options['aws_secret_access_key'] = frozen.secret_key
    if frozen.token:
      options['aws_session_token'] = frozen.token
    return options

  def read(self, path, limit=None):
    import obstore

    bucket, key = bucket_key(path)
    # A ranged read: at most limit + 1 bytes ever arrive.
    options = None if limit is None else {'range': (0, limit + 1)}
    try:
      return bytes(obstore.get(self._bucket(bucket), key, options=options).bytes())
    except Exception as e:
      if limit is not None and _status(e) == 416:  # a range on an empty object
        return b''
      raise _error(e, path) from e

  def _pages(self, prefix: str, delimiter: str | None):
    bucket = bucket_key(prefix)[0]
    arguments = {'Bucket': bucket, 'Prefix': folder_key(prefix)}
    if delimiter:
      arguments['Delimiter'] = delimiter
    try:
      yield from self._client.get_paginator('list_objects_v2').paginate(**arguments)
    except Exception as e:
      raise os_error(e, prefix) from e

  def files(self, prefix):
    bucket = bucket_key(prefix)[0]
    for page in self._pages(prefix, None):
      for item in page.get('Contents', ()):
        yield f's3://{bucket}/{item["Key"]}'

  def level(self, prefix):
    bucket = bucket_key(prefix)[0]
    files, folders = [], []
    for page in self._pages(prefix, '/'):
      files += [f's3://{bucket}/{o["Key"]}' for o in page.get('Contents', ())]
      folders += [
        f's3://{bucket}/{p["Prefix"].rstrip("/")}'
        for p in page.get('CommonPrefixes', ())
      ]
    return files, folders

  def open_read(self, path):
    import obstore

    bucket, key = bucket_key(path)
    try:
      reader = obstore.open_reader(self._bucket(bucket), key, buffer_size=1 << 20)
      return _RangedFile(reader)
    except Exception as e:
      raise _error(e, path) from e

  def stamped(self, prefix, top):
    bucket = bucket_key(prefix)[0]
    files, folders = [], []
    for page in self._pages(prefix, '/' if top else None):
      files += [
        (f's3://{bucket}/{o["Key"]}', f'{o["Size"]}:{o["ETag"]}')
        for o in page.get('Contents', ())
      ]
      folders += [
        f's3://{bucket}/{p["Prefix"].rstrip("/")}'
        for p in page.get('CommonPrefixes', ())
      ]
    return files, folders

  def create(self, path):
    bucket, key = bucket_key(path)
    try:
      return _Upload(self._bucket(bucket), key, path)
    except Exception as e:
      raise _error(e, path) from e

  def create_exclusive(self, path, data):
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError

    bucket, key = bucket_key(path)
    try:
      obstore.put(self._bucket(bucket), key, data, mode='create')
    except (AlreadyExistsError, PreconditionError):
      return False
    except Exception as e:
      if _status(e) in (409, 412):
        return False
      raise _error(e, path) from e
    return True

  def exists(self, path):
    import obstore

    bucket, key = bucket_key(path)
    try:
      obstore.head(self._bucket(bucket), key)
    except FileNotFoundError:
      return False
    except Exception as e:
      raise _error(e, path) from e
    return True

  def copy(self, source, target):
    import obstore

    bucket, key = bucket_key(source)
    to_bucket, to_key = bucket_key(target)
    try:
      if bucket == to_bucket:  # server-side
        obstore.copy(self._bucket(bucket), key, to_key)
      else:
        self._client.copy_object(
          Bucket=to_bucket, Key=to_key, CopySource={'Bucket': bucket, 'Key': key}
        )
    except Exception as e:
      raise (_error if bucket == to_bucket else os_error)(e, source) from e

  def delete(self, paths):
    import obstore

    by_bucket: dict[str, list[str]] = {}
    for path in paths:
      bucket, key = bucket_key(path)
      by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
      try:  # batches of S3's 1,000; missing keys are no error
        obstore.delete(self._bucket(bucket), [k for k in keys if k])
      except FileNotFoundError:
        pass
      except Exception as e:
        raise _error(e, f's3://{bucket}') from e


class _RangedFile(io.RawIOBase):
  """obstore's ReadableFile (ranged GETs) as a Python file object."""

  def __init__(self, reader):
    super().__init__()
    self._reader = reader

  def readable(self) -> bool:
    return True

  def seekable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    data = memoryview(self._reader.read(len(buffer)))
    buffer[: len(data)] = data
    return len(data)

  def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
    return self._reader.seek(offset, whence)

  def tell(self) -> int:
    return self._reader.tell()

  def close(self) -> None:
    if not self.closed:
      self._reader.close()
    super().close()
