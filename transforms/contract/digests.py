"""Content digests of a dataset's files, recorded in each version's run record.

Every Parquet file of a dataset (slice shards and both reports) is hashed
while it is written; the run record's ``files`` (in the version's commit)
maps each file's path, relative to the output root, to its size and digest,
and the record carries a digest of its own content. ``verify`` re-hashes
every file, and the reader (``beam_pipeline.dataset``) refuses a version with
a missing, extra, resized or re-hashed file.

The digest is xxh3-128: it finds accidental change (a flipped bit, a
truncated copy, a stray shard) at memory speed, which a cryptographic hash
would not (several times slower), and it is no defence against deliberate
tampering: sign the record for that.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import BinaryIO

import xxhash

ALGORITHM = 'xxh3_128'

# Written beside a table's files by the sink, read and removed before publish.
MANIFEST_FILE = '_MANIFEST.json'
# In a manifest entry on an object store: the object holding the file until
# it is published (the sink's temporary object: copied once, into OUT/).
SOURCE = 'source'

# The summary's key for its own digest, and for the file table.
SUMMARY_DIGEST = 'summary_xxh3_128'
FILES = 'files'

_READ_SIZE = 8 * 1024 * 1024


def hasher():
  """A new incremental hasher (``update(bytes)``, ``hexdigest()``)."""
  return xxhash.xxh3_128()


# In a manifest entry: the file's statistics for its Delta ``add`` action
# (``filestats.of_footer``), taken from the footer as it is written.
STATS = 'stats'


def entry(size: int, digest: str, stats: str | None = None) -> dict:
  """One file's record in a manifest (with its ``stats``) and in the
  summary's ``files`` (size and digest only)."""
  found = {'bytes': size, ALGORITHM: digest}
  if stats is not None:
    found[STATS] = stats
  return found


def of_stream(stream: BinaryIO) -> tuple[int, str]:
  """(bytes, digest) of everything left in ``stream``."""
  h = hasher()
  size = 0
  while chunk := stream.read(_READ_SIZE):
    h.update(chunk)
    size += len(chunk)
  return size, h.hexdigest()


def of_summary(summary: Mapping) -> str:
  """The digest of a summary's content, its own digest field left out."""
  content = {k: v for k, v in summary.items() if k != SUMMARY_DIGEST}
  canonical = json.dumps(content, sort_keys=True, separators=(',', ':'))
  return xxhash.xxh3_128_hexdigest(canonical.encode())
