"""Files on a local disk, S3 or GCS, through one small interface.

Beam's own S3 and GCS file systems build a new client for every call
(``s3io.S3IO(options)`` per open), so the hot paths here use the vendors'
clients directly, built once per worker process and shared by its threads:
``store(path)`` gives the store of a path (transforms.io.local, .s3, .gcs;
the ``Store`` protocol is transforms.io.protocol's), ``configure`` sets the
process's configuration, and the helpers below work on any store.

Credentials are never options: boto3 and google-auth find them on each
machine (environment variables, profiles, instance roles).

Object stores have no rename and no folders: ``copy`` is a server-side copy,
a "folder" is a key prefix, and ``create_exclusive`` is a conditional create
(S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from transforms.contract import local_files, redact
from transforms.io.gcs import GcsStore
from transforms.io.local import LocalStore
from transforms.io.protocol import Store, StoreConfig, is_local
from transforms.io.s3 import S3Store

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
  if getattr(config, 'redact_logs', False):  # None: a stage given no config
    redact.install()
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


def move_all(pairs: list[tuple[str, str]], under: str | None = None) -> None:
  """Moves (source, target) files: renames on a local disk; parallel
  server-side copies, then one batch of deletes, on an object store.

  Args:
    under: a local folder holding every local source and target (an
      output: the staging folder and the table folders in it). The folders
      below it are then opened without following a link, made if absent,
      and each file renamed between their descriptors
      (``local_files.Folder``): a folder swapped for a link after it was
      checked is refused, never moved through (PlantedError). None: by path.
  """
  local = [pair for pair in pairs if is_local(pair[0])]
  if under is None:
    for source, target in local:
      os.makedirs(os.path.dirname(target) or '.', exist_ok=True)
      os.replace(source, target)
  elif local:
    _move_below(under, local)
  remote = [pair for pair in pairs if not is_local(pair[0])]
  if remote:
    copy_all(remote)
    store(remote[0][0]).delete([source for source, _ in remote])


def _move_below(root: str, pairs: list[tuple[str, str]]) -> None:
  """``move_all`` below the local folder ``root``: each folder between
  ``root`` and a file opened once, by descriptor, never through a link."""
  with contextlib.ExitStack() as held:
    folders = {(): held.enter_context(local_files.Folder.open(root))}

    def folder(parts: tuple[str, ...]) -> local_files.Folder:
      if parts not in folders:
        # 0o777 less the umask: as os.makedirs made them
        made = folder(parts[:-1]).folder(parts[-1], 0o777)
        folders[parts] = held.enter_context(made)
      return folders[parts]

    def place(path: str) -> tuple[local_files.Folder, str]:
      parts = tuple(os.path.relpath(path, root).split(os.sep))
      if parts[0] == os.pardir:
        raise ValueError(f'{path} is not below {root}')
      return folder(parts[:-1]), parts[-1]

    for source, target in pairs:
      (source_folder, source_name), (target_folder, target_name) = (
        place(source),
        place(target),
      )
      target_folder.take(source_folder, source_name, target_name)


def table_options(path: str) -> dict[str, str]:
  """deltalake's ``storage_options`` for a table at ``path``: how this
  process reaches its store (none for a local disk, or a store whose client
  finds its credentials itself)."""
  found = store(path)
  options = getattr(found, 'table_options', None)
  return options() if options else {}


def read_bytes(path: str) -> bytes:
  return store(path).read(path)


def readable(path: str):
  """A seekable file object to read ``path`` from: the file itself locally,
  ranged reads on an object store (the caller closes it)."""
  return store(path).open_read(path)


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
