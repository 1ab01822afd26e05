"""Reading and listing the input tree (local, or an object store: stores).

Every read goes through :func:`read_input`, which joins a path relative to the
input root and, on local disks, reads only a regular file whose real location
(after symlinks, as the opened file has it) lies inside that root. Local
trees are listed by :func:`walk_local`. Nothing here writes: the output side
is the write stage's and the application's.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Iterator

from transforms.contract import local_files, schema
from transforms.contract.errors import FileTooLargeError, UnsafePathError
from transforms.io import stores
from transforms.io.protocol import is_local
from transforms.outcomes import Failed

# The listing's reason for an empty folder (see walk_local).
EMPTY_FOLDER = 'empty folder'
NOT_UTF8 = 'name is not valid UTF-8 (shown with \\x escapes)'


def join_path(root: str, relative: str) -> str:
  """The full path of ``relative`` (always ``/``-separated) under ``root``."""
  return stores.join(root, relative)


def relative_to(root: str, path: str) -> str:
  """``path`` relative to ``root``, ``/``-separated.

  Raises:
    UnsafePathError: ``path`` is not below ``root``.
  """
  prefix = root.rstrip('/') + '/'
  if is_local(path):
    path = path.replace(os.sep, '/')
  if not path.startswith(prefix):
    raise UnsafePathError(f'{path} is not under the input root {root}')
  return path[len(prefix) :]


@functools.lru_cache(maxsize=8)
def _real_root(root: str) -> str:
  return os.path.realpath(root).rstrip('/') + '/'


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
  return os.path.realpath(folder)


# Never through a link at the file's name, never waiting on a FIFO.
_OPEN = (
  os.O_RDONLY
  | getattr(os, 'O_NOFOLLOW', 0)
  | getattr(os, 'O_NONBLOCK', 0)
  | getattr(os, 'O_CLOEXEC', 0)
)


def _outside(real: str) -> UnsafePathError:
  return UnsafePathError(
    f'resolves outside the input root (to {real}); symlinks leaving the '
    'input are not followed'
  )


def _not_regular(found: os.stat_result) -> OSError:
  return OSError(f'not a regular file ({local_files.kind(found)}); not read')


def _opened_path(fd: int, path: str) -> str:
  """The real path of the file open at ``fd``: where the descriptor leads
  (Linux's /proc), not where its name led when it was looked at; elsewhere
  ``path``'s real path."""
  try:
    return os.readlink(f'/proc/self/fd/{fd}')
  except OSError:
    return os.path.realpath(path)


def _open_inside(root: str, full_path: str) -> int:
  """A read-only descriptor of the regular file at ``full_path``, which lies
  under ``root``.

  Anything but a regular file or a symlink at the name is refused unopened
  (a FIFO would block a plain open forever), and so is a name that resolves
  outside ``root``. A symlink is resolved and its target opened, the
  target's name not followed in turn. The file is opened without following
  a link at its name and without waiting, then checked where it stands: a
  regular file (``fstat``) whose real path, read from the descriptor
  itself, is under ``root``. A link or a FIFO swapped in after the first
  look is never followed nor waited on, and never leads outside.

  Raises:
    UnsafePathError: the file resolves outside ``root``.
    OSError: it does not exist, is not a regular file, or cannot be opened.
  """
  folder, name = os.path.split(full_path)
  found = os.lstat(full_path)
  if name in ('', '.', '..') or stat.S_ISLNK(found.st_mode):
    path = os.path.realpath(full_path)
  elif not stat.S_ISREG(found.st_mode):
    raise _not_regular(found)
  else:  # folders' real paths are cached: a tree's folders are few
    path = os.path.join(_real_folder(folder), name)
  if not path.startswith(_real_root(root)):  # not opened at all
    raise _outside(path)
  fd = os.open(path, _OPEN)  # ELOOP: a link swapped in since the lstat
  try:
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):
      raise _not_regular(opened)
    real = _opened_path(fd, path)
    if not real.startswith(_real_root(root)):
      raise _outside(real)
    os.set_blocking(fd, True)
  except BaseException:
    os.close(fd)
    raise
  return fd


def _too_large(size: int, limit: int) -> FileTooLargeError:
  return FileTooLargeError(
    f'file of {size} bytes is larger than --max-file-bytes {limit}; not read'
  )


def read_input(root: str, relative: str, limit: int | None = None) -> bytes:
  """Reads a whole file under the input root.

  Args:
    limit: the largest size read; a larger file is refused before its bytes
      are read (locally from its size; elsewhere, where a size costs a
      request, once more than ``limit`` bytes have arrived).

  Raises:
    UnsafePathError: the file resolves outside ``root`` (locally, where the
      opened file is, whatever its name leads to).
    FileTooLargeError: the file holds more than ``limit`` bytes.
    OSError: the file cannot be read, or is not a regular file (a FIFO is
      never opened nor waited on).
  """
  full_path = join_path(root, relative)
  if is_local(full_path):
    with os.fdopen(_open_inside(root, full_path), 'rb') as f:
      if limit is not None and (size := os.fstat(f.fileno()).st_size) > limit:
        raise _too_large(size, limit)
      data = f.read()
  else:
    data = stores.store(full_path).read(full_path, limit)
  if limit is not None and len(data) > limit:  # it grew, or its size is unknown
    raise _too_large(len(data), limit)
  return data


def read_or_fail(root: str, relative: str, limit: int | None = None) -> bytes | Failed:
  """The file's bytes, or Failed (stage read) saying why not; never raises.
  See :func:`read_input` for ``limit``."""
  try:
    return read_input(root, relative, limit)
  except FileTooLargeError as e:
    return Failed(schema.STAGE_READ, str(e))
  except (OSError, UnsafePathError) as e:
    return Failed(schema.STAGE_READ, f'cannot read: {e}')
  except Exception as e:  # e.g. a file system without its options here
    return Failed(schema.STAGE_READ, f'cannot read: {type(e).__name__}: {e}')


def _is_utf8(name: str) -> bool:
  """False for a name whose bytes are not UTF-8 (os gives them as surrogates)."""
  try:
    name.encode('utf-8')
  except UnicodeEncodeError:
    return False
  return True


def shown_path(path: str) -> str:
  """``path`` as UTF-8 text: bytes that are not UTF-8 become ``\\xNN``."""
  return os.fsencode(path).decode('utf-8', 'backslashreplace')


def walk_local(top: str) -> Iterator[tuple[str, str | None]]:
  """Every entry below the local folder ``top`` that matters to a listing.

  Yields (path, None) for each regular file (symlinks to files included: the
  read checks where they lead), and (path, reason) for what cannot be used:
  symlinked or unreadable folders, broken symlinks, FIFOs and other special
  files (reading a FIFO would block forever), and files or folders whose name
  is not UTF-8 (any name the file system holds; the path is shown with
  ``\\xNN`` escapes and a folder is not entered). Iterative, so any depth is
  fine; symlinked folders are never followed.
  """
  stack = [top]
  while stack:
    folder = stack.pop()
    try:
      entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
      yield folder, f'cannot list folder: {e.strerror or e}'
      continue
    if not entries and folder != top:
      yield folder, EMPTY_FOLDER
    for entry in entries:
      if not _is_utf8(entry.name):  # the rows that name it must be UTF-8 text
        yield shown_path(entry.path), NOT_UTF8
        continue
      try:
        if entry.is_symlink():
          if not os.path.exists(entry.path):
            yield entry.path, 'broken symlink'
          elif os.path.isdir(entry.path):
            yield entry.path, 'symlinked folder, not followed'
          elif os.path.isfile(entry.path):
            yield entry.path, None
          else:
            yield entry.path, 'symlink to a special file'
        elif entry.is_dir(follow_symlinks=False):
          stack.append(entry.path)
        elif entry.is_file(follow_symlinks=False):
          yield entry.path, None
        else:
          yield entry.path, 'not a regular file (FIFO, socket or device)'
      except OSError as e:
        yield entry.path, f'cannot stat: {e.strerror or e}'
