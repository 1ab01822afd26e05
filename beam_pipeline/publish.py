"""The output side of a run: staging, the existing-output check, publishing.

A run writes into ``OUT/_incomplete-<run id>/`` and moves the finished dataset into
place only when the pipeline succeeded, writing ``OUT/_SUMMARY.json`` last
(``beam_pipeline.summary``): a killed run leaves any previous dataset
untouched, and ``_SUMMARY.json`` exists only beside a complete dataset.
Works on any Beam file system (local, ``s3://``, ``gs://``).
"""

from __future__ import annotations

import json
import logging
import os

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.contract import digests
from beam_pipeline.contract import schema as s
from beam_pipeline.contract.errors import UsageError
from beam_pipeline.contract.layout import is_local

_LOG = logging.getLogger(__name__)

DATA_ENTRIES = (s.SLICES_DIR, s.RECONCILIATION_DIR, s.ERRORS_DIR)
OUTPUT_ENTRIES = (*DATA_ENTRIES, s.SUMMARY_FILE)


def staging_path(output: str, run_id: str) -> str:
  """Where the run ``run_id`` writes before its dataset is moved into
  ``output``: a folder of its own, so no run can publish another's files."""
  return FileSystems.join(output, f'{s.STAGING_DIR}-{run_id}')


def _under(path: str) -> list[str]:
  """Every file below ``path`` (a folder, or an object-store prefix)."""
  return [
    m.path for m in FileSystems.match([path.rstrip('/') + '/**'])[0].metadata_list
  ]


def exists(path: str) -> bool:
  """True for a file, a folder, or an object-store prefix holding objects."""
  return FileSystems.exists(path) or (not is_local(path) and bool(_under(path)))


def delete_tree(path: str) -> None:
  """Deletes a file or a folder; on object stores, every object under it."""
  if is_local(path):
    FileSystems.delete([path])
    return
  found = _under(path) + ([path] if FileSystems.exists(path) else [])
  if found:
    FileSystems.delete(found)


def made_from(output: str) -> str | None:
  """The --input recorded in ``output``'s _SUMMARY.json, or None."""
  path = FileSystems.join(output, s.SUMMARY_FILE)
  try:
    with FileSystems.open(path) as f:
      return json.loads(f.read()).get('input')
  except Exception:  # absent, unreadable or not ours: nothing is known
    return None


def check_replaceable(output: str, overwrite: bool) -> None:
  """Raises UsageError if ``output`` holds a dataset and ``overwrite`` is unset."""
  existing = [
    entry for entry in OUTPUT_ENTRIES if exists(FileSystems.join(output, entry))
  ]
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
      {os.path.join(output, n) for n in names if n.startswith(s.STAGING_DIR)}
    )
  else:
    prefix = output.rstrip('/') + '/'
    left = sorted(
      {
        prefix + path[len(prefix) :].split('/', 1)[0]
        for path in _under(output)
        if path[len(prefix) :].startswith(s.STAGING_DIR)
      }
    )
  for staging in left:
    _LOG.warning('removing %s, left by an interrupted run', staging)
    delete_tree(staging)


def take_manifests(output: str, run_id: str) -> dict[str, dict]:
  """The staged files' sizes and digests, {path relative to the output:
  entry}, from the manifest each table's sink wrote; the manifests are
  removed, so only the summary records them."""
  staging = staging_path(output, run_id)
  files = {}
  for entry in DATA_ENTRIES:
    path = FileSystems.join(staging, entry, digests.MANIFEST_FILE)
    with FileSystems.open(path) as f:
      manifest = json.loads(f.read())
    FileSystems.delete([path])
    files.update({f'{entry}/{name}': v for name, v in sorted(manifest.items())})
  return files


def publish(output: str, run_id: str) -> dict[str, str]:
  """Moves the staged dataset into ``output``, replacing any previous one.

  The old summary goes first and the new one is written after this, so a
  crash part-way never leaves a dataset that looks complete.

  Returns:
    {entry: its path} for each published table folder.
  """
  staging = staging_path(output, run_id)
  summary = FileSystems.join(output, s.SUMMARY_FILE)
  if FileSystems.exists(summary):
    FileSystems.delete([summary])
  for entry in DATA_ENTRIES:
    old = FileSystems.join(output, entry)
    if exists(old):
      delete_tree(old)
  staged = _under(staging)
  targets = [output + path[len(staging) :] for path in staged]
  if is_local(output):  # object stores have no folders to make
    for entry in DATA_ENTRIES:
      FileSystems.mkdirs(FileSystems.join(output, entry))
  FileSystems.rename(staged, targets)
  delete_tree(staging)
  return {entry: FileSystems.join(output, entry) for entry in DATA_ENTRIES}


def absolute(path: str) -> str:
  """A local path made absolute; other file systems' paths as given."""
  return os.path.abspath(path) if is_local(path) else path
