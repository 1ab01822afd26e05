"""``gs://`` through google-cloud-storage (or an emulator at
``STORAGE_EMULATOR_HOST``), one client per worker process; its default retry
retries 429 and 5xx (exponential, jittered, 120 s in all).
``create_exclusive`` is a conditional create (``ifGenerationMatch=0``).
"""

from __future__ import annotations

from transforms.io.protocol import (
  PART_SIZE,
  SPARE_CONNECTIONS,
  AppendOnlyFile,
  StoreConfig,
  bucket_key,
  folder_key,
  os_error,
)


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
      raise os_error(e, self._path) from e
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
        raise os_error(e, self._path) from e


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
    bucket, key = bucket_key(path)
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
      raise os_error(e, path) from e

  def _listing(self, prefix: str, delimiter: str | None):
    bucket = bucket_key(prefix)[0]
    return self._client.list_blobs(
      bucket, prefix=folder_key(prefix), delimiter=delimiter
    )

  def files(self, prefix):
    bucket = bucket_key(prefix)[0]
    try:
      for blob in self._listing(prefix, None):
        yield f'gs://{bucket}/{blob.name}'
    except Exception as e:
      raise os_error(e, prefix) from e

  def level(self, prefix):
    bucket = bucket_key(prefix)[0]
    try:
      listing = self._listing(prefix, '/')
      files = [f'gs://{bucket}/{blob.name}' for blob in listing]
      folders = [f'gs://{bucket}/{p.rstrip("/")}' for p in sorted(listing.prefixes)]
    except Exception as e:
      raise os_error(e, prefix) from e
    return files, folders

  def open_read(self, path):
    try:
      return self._blob(path).open('rb', chunk_size=1 << 20)
    except Exception as e:
      raise os_error(e, path) from e

  def stamped(self, prefix, top):
    bucket = bucket_key(prefix)[0]
    try:
      listing = self._listing(prefix, '/' if top else None)
      files = [
        (f'gs://{bucket}/{blob.name}', f'{blob.size}:{blob.generation}')
        for blob in listing
      ]
      folders = [f'gs://{bucket}/{p.rstrip("/")}' for p in sorted(listing.prefixes)]
    except Exception as e:
      raise os_error(e, prefix) from e
    return files, folders

  def create(self, path):
    return _GcsUpload(self._blob(path), path)

  def create_exclusive(self, path, data):
    try:
      self._blob(path).upload_from_string(data, if_generation_match=0)
    except Exception as e:
      if getattr(e, 'code', None) == 412:
        return False
      raise os_error(e, path) from e
    return True

  def exists(self, path):
    try:
      return self._blob(path).exists()
    except Exception as e:
      raise os_error(e, path) from e

  def copy(self, source, target):
    bucket, key = bucket_key(source)
    to_bucket, to_key = bucket_key(target)
    try:
      self._client.bucket(bucket).copy_blob(
        self._client.bucket(bucket).blob(key), self._client.bucket(to_bucket), to_key
      )
    except Exception as e:
      raise os_error(e, source) from e

  def delete(self, paths):
    for path in paths:
      try:
        self._blob(path).delete()
      except Exception as e:
        error = os_error(e, path)
        if not isinstance(error, FileNotFoundError):
          raise error from e
