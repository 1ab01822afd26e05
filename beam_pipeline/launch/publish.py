"""The output side of a run: staging, the existing-output check, publishing.

A run writes into ``OUT/_incomplete-<run id>/`` and moves the finished dataset into
place only when the pipeline succeeded, writing ``OUT/_SUMMARY.json`` last
(``beam_pipeline.launch.summary``): a killed run leaves any previous dataset
untouched, and ``_SUMMARY.json`` exists only beside a complete dataset.
Works on a local disk and on object stores (``s3://``, ``gs://``; see
``transforms.io.stores``), where moving is a parallel server-side copy.
"""

from __future__ import annotations

import json
import logging
import os

from transforms.contract import digests, schema
from transforms.contract.errors import UsageError
from transforms.io import stores
from transforms.io.protocol import is_local

_LOG = logging.getLogger(__name__)

DATA_ENTRIES = (schema.SLICES_DIR, schema.RECONCILIATION_DIR, schema.ERRORS_DIR)
OUTPUT_ENTRIES = (*DATA_ENTRIES, schema.SUMMARY_FILE)


def staging_path(output: str, run_id: str) -> str:
  """Where the run ``run_id`` writes before its dataset is moved into
  ``output``: a folder of its own, so no run can publish another's files."""
  return stores.join(output, f'{schema.STAGING_DIR}-{run_id}')


exists = stores.exists
delete_tree = stores.delete_tree


def made_from(output: str) -> str | None:
  """The --input recorded in ``output``'s _SUMMARY.json, or None."""
  path = stores.join(output, schema.SUMMARY_FILE)
  try:
    return json.loads(stores.read_bytes(path)).get('input')
  except Exception:  # absent, unreadable or not ours: nothing is known
    return None


def check_replaceable(output: str, overwrite: bool) -> None:
  """Raises UsageError if ``output`` holds a dataset and ``overwrite`` is unset."""
  try:
    existing = [e for e in OUTPUT_ENTRIES if exists(stores.join(output, e))]
  except OSError as e:  # e.g. a bucket that does not exist
    raise UsageError(f'--output {output} is not writable: {e}') from e
  if existing and not overwrite:
    raise UsageError(
      f'--output {output} already holds a dataset ({", ".join(existing)}); pass '
      '--overwrite to replace it, or choose another --output'
    )


def clear_staging(output: str) -> None:
  """Deletes the staging folders left by interrupted runs (call it holding
  the output's lock: no other run is writing then)."""
  if is_local(output):
    names = os.listdir(output) if os.path.isdir(output) else []
    left = sorted(
      {os.path.join(output, n) for n in names if n.startswith(schema.STAGING_DIR)}
    )
  else:
    prefix = output.rstrip('/') + '/'
    left = sorted(
      {
        prefix + path[len(prefix) :].split('/', 1)[0]
        for path in stores.files_under(output)
        if path[len(prefix) :].startswith(schema.STAGING_DIR)
      }
    )
  for staging in left:
    _LOG.warning('removing %s, left by an interrupted run', staging)
    delete_tree(staging)


def take_manifests(output: str, run_id: str) -> dict[str, dict]:
  """The staged files, {path relative to the output: entry}: size and
  digest, and on an object store the object holding the file
  (``digests.SOURCE``), from the manifest each table's sink wrote; the
  manifests are removed, so only the summary records the files."""
  staging = staging_path(output, run_id)
  files = {}
  for entry in DATA_ENTRIES:
    path = stores.join(staging, entry, digests.MANIFEST_FILE)
    manifest = json.loads(stores.read_bytes(path))
    stores.store(path).delete([path])
    files.update({f'{entry}/{name}': v for name, v in sorted(manifest.items())})
  return files


def recorded(files: dict[str, dict]) -> dict[str, dict]:
  """``files`` as the summary records them: size and digest only."""
  return {
    path: {k: v for k, v in entry.items() if k != digests.SOURCE}
    for path, entry in files.items()
  }


def publish(output: str, run_id: str, files: dict[str, dict]) -> dict[str, str]:
  """Moves the staged ``files`` (take_manifests) into ``output``, replacing
  any previous dataset, and removes the staging folder.

  Locally each file is renamed; on an object store each is copied once,
  server-side, from the object the sink wrote (32 at a time), then deleted.
  The old summary goes first and the new one is written after this, so a
  crash part-way never leaves a dataset that looks complete.

  Returns:
    {entry: its path} for each published table folder.
  """
  staging = staging_path(output, run_id)
  summary = stores.join(output, schema.SUMMARY_FILE)
  stores.store(summary).delete([summary])
  for entry in DATA_ENTRIES:
    old = stores.join(output, entry)
    if exists(old):
      delete_tree(old)
  if is_local(output):  # object stores have no folders to make
    for entry in DATA_ENTRIES:
      os.makedirs(stores.join(output, entry), exist_ok=True)
  stores.move_all(
    [
      (
        entry.get(digests.SOURCE) or stores.join(staging, path),
        stores.join(output, path),
      )
      for path, entry in files.items()
    ]
  )
  delete_tree(staging)
  return {entry: stores.join(output, entry) for entry in DATA_ENTRIES}


def absolute(path: str) -> str:
  """A local path made absolute; other file systems' paths as given."""
  return os.path.abspath(path) if is_local(path) else path
