"""What every store is: the ``Store`` protocol, its files, its configuration.

Beam-free and cheap to import (``--help`` reads the defaults from here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Protocol

DEFAULT_READ_CONCURRENCY = 32


DEFAULT_ATTEMPTS = 8


# Connections each client's pool keeps beyond --read-concurrency (the
# requests in flight a worker allows).
SPARE_CONNECTIONS = 8


PART_SIZE = 8 * 1024 * 1024  # multipart upload parts (S3's minimum is 5 MiB)


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
    redact_logs: under pseudonymisation: every worker that configures its
      stores rewrites the log records it did not write itself
      (transforms.contract.redact), e.g. a client library's retried URL.
  """

  s3_endpoint_url: str | None = None
  s3_region: str | None = None
  s3_verify: bool | str | None = None
  read_concurrency: int = DEFAULT_READ_CONCURRENCY
  attempts: int = DEFAULT_ATTEMPTS
  redact_logs: bool = False


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

  def stamped(self, prefix: str, top: bool) -> tuple[list[tuple[str, str]], list[str]]:
    """([(file, stamp)], sub-folders): with ``top``, what is directly in the
    folder ``prefix`` (as ``level``), else every file under it (as
    ``files``, no sub-folders). A stamp changes whenever the object's
    content may have (layout.DicomFile)."""

  def open_read(self, path: str) -> BinaryIO:
    """A seekable file to read ``path`` from; on an object store each read
    is a ranged request, so a Parquet reader fetches only the footer and
    the columns it needs (the caller closes it)."""

  def create(self, path: str) -> AppendOnlyFile:
    """A new file written as it goes (multipart on object stores)."""

  def create_exclusive(self, path: str, data: bytes) -> bool:
    """Writes ``data`` only if ``path`` does not exist; False if it did."""

  def exists(self, path: str) -> bool: ...

  def copy(self, source: str, target: str) -> None: ...

  def delete(self, paths: Iterable[str]) -> None:
    """Deletes files; missing ones are ignored."""


def bucket_key(path: str) -> tuple[str, str]:
  """``scheme://bucket/key`` -> (bucket, key)."""
  bucket, _, key = path.split('://', 1)[1].partition('/')
  return bucket, key


def folder_key(prefix: str) -> str:
  key = bucket_key(prefix)[1]
  return key.rstrip('/') + '/' if key else ''


def os_error(e: Exception, path: str) -> OSError:
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
