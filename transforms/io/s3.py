"""``s3://`` through boto3, built once per worker process and shared by its
threads.

boto3 measured fastest against an S3-compatible server (BENCHMARKS.md):
pyarrow.fs sends a HEAD before every GET. The GETs of the hot path are
signed with botocore's signer and sent through urllib3 (_SignedGets); the
rest uses the boto3 client, whose ``standard`` retry mode retries throttling
(503 SlowDown, 429) and transient errors (5xx, dropped connections) with
exponential backoff and full jitter, capped at 20 s a wait, up to
``StoreConfig.attempts`` attempts. The endpoint and region come from Beam's
standard ``--s3_endpoint_url`` and ``--s3_region_name``; uploads larger than
one part are multipart, and ``create_exclusive`` is a conditional create
(``If-None-Match: *``).
"""

from __future__ import annotations

import contextlib

from transforms.io.http import http_pool
from transforms.io.protocol import (
  PART_SIZE,
  SPARE_CONNECTIONS,
  AppendOnlyFile,
  StoreConfig,
  bucket_key,
  folder_key,
  os_error,
)


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
      raise os_error(e, f's3://{self._bucket}/{self._key}') from e
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
        raise os_error(e, path) from e
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
      raise os_error(e, path) from e


class _SignedGets:
  """GETs of S3 objects, signed with botocore's SigV4 signer and sent through
  one urllib3 connection pool: the hot path of a run.

  A boto3 ``get_object`` spends most of its CPU in botocore's event, parsing
  and checksum machinery; this costs about half as much (BENCHMARKS.md), and
  the saving is GIL time the decoding thread gets back. Everything else
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

    url = self._url(*bucket_key(path))
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

  def create(self, path):
    return _S3Upload(self._client, *bucket_key(path))

  def create_exclusive(self, path, data):
    bucket, key = bucket_key(path)
    try:
      self._client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch='*')
    except Exception as e:
      status = getattr(e, 'response', {}).get('ResponseMetadata', {})
      if status.get('HTTPStatusCode') in (409, 412):
        return False
      raise os_error(e, path) from e
    return True

  def exists(self, path):
    bucket, key = bucket_key(path)
    try:
      self._client.head_object(Bucket=bucket, Key=key)
    except Exception as e:
      error = os_error(e, path)
      if isinstance(error, FileNotFoundError):
        return False
      raise error from e
    return True

  def copy(self, source, target):
    bucket, key = bucket_key(source)
    to_bucket, to_key = bucket_key(target)
    try:
      self._client.copy_object(
        Bucket=to_bucket, Key=to_key, CopySource={'Bucket': bucket, 'Key': key}
      )
    except Exception as e:
      raise os_error(e, source) from e

  def delete(self, paths):
    by_bucket: dict[str, list[str]] = {}
    for path in paths:
      bucket, key = bucket_key(path)
      by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
      for start in range(0, len(keys), 1000):  # S3's batch limit
        batch = [{'Key': k} for k in keys[start : start + 1000]]
        try:
          self._client.delete_objects(Bucket=bucket, Delete={'Objects': batch})
        except Exception as e:
          raise os_error(e, f's3://{bucket}') from e
