"""Files on a local disk, as a Store.

Files are written without following a link planted at their name: ``create``
writes only a new file or a regular file of one link (never a link's target,
never a FIFO), ``create_exclusive`` only a new one
(``transforms.contract.local_files``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

from transforms.contract import layout, local_files
from transforms.io.protocol import AppendOnlyFile

_READ_STEP = 8 * 1024 * 1024


def stamp(path: str, now_ns: int) -> str:
  """The stamp of the local file ``path`` (layout.disk_stamp), '' if it
  cannot be read."""
  try:
    st = os.stat(path)
  except OSError:
    return ''
  return layout.disk_stamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, now_ns)


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
    self._f = local_files.rewrite(path)

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

  def open_read(self, path):
    return open(path, 'rb')  # noqa: SIM115 (the caller closes it)

  def stamped(self, prefix, top):
    if top:
      files, folders = self.level(prefix)
    else:
      files, folders = list(self.files(prefix)), []
    now = time.time_ns()
    return [(path, stamp(path, now)) for path in files], folders

  def create(self, path):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    return _LocalFile(path)

  def create_exclusive(self, path, data):
    try:
      f = local_files.create_new(path, 0o644)
    except FileExistsError:  # a link there too: never followed
      return False
    with f:
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
