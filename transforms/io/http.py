"""The HTTP connection pool of the hot paths (DICOMweb's retrieves and searches)."""

from __future__ import annotations

from transforms.io.protocol import SPARE_CONNECTIONS

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
