"""Local files the pipeline reads as secrets or writes: never through a link
or a FIFO someone planted.

Anyone who may write in a folder the pipeline writes to (a shared output, a
QA folder, the folder of the id map) can plant a symbolic link, a FIFO or a
hard link at a name the pipeline is about to write. A file opened there by
name, following links, then truncated and rewritten, writes whatever the
link leads to with the operator's rights. So here:

- a new file is created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``),
  which never follows a link and fails if anything is at the name;
- a file that may replace an older one is written under a fresh name in the
  same folder and renamed over it (``os.replace`` replaces a link itself,
  never what it leads to); one that must replace nothing is hard-linked into
  place, which fails if the name is taken (``Folder.put``);
- sub-folders are opened without following a link (``O_NOFOLLOW |
  O_DIRECTORY``) and written through their descriptors, so a folder swapped
  for a link after it was opened is never written through (``Folder``);
- a file rewritten in place (``rewrite``) must be a regular file of one link;
- a secret (a key, credentials) is read only from a regular file, not a
  link, that no other user may read or write, its group's included
  (``read_private``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from typing import BinaryIO

from transforms.contract.errors import UsageError

_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)
_NONBLOCK = getattr(os, 'O_NONBLOCK', 0)
_DIRECTORY = getattr(os, 'O_DIRECTORY', 0)
# A new file: made here or not at all; never through a link.
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
# A file written from its start: never through a link, never waiting on a FIFO.
_REWRITE = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | _NONBLOCK | _CLOEXEC
_SECRET_BYTES = 1 << 16  # read from a key or credentials file, at most
# A secret's file that another user may read or write: its group's members
# are other users too.
_SHARED = stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH


class PlantedError(OSError):
  """Something the pipeline did not make is where it writes (a link, a FIFO,
  a folder, a file of several links)."""

  def __init__(self, path: str, what: str):
    super().__init__(
      errno.EEXIST, f'{path} is {what}, not one this pipeline made; remove it', path
    )

  def __str__(self) -> str:
    return self.strerror


def kind(found: os.stat_result) -> str:
  """What an ``lstat`` result is, in words ('a symbolic link', 'a FIFO', ...)."""
  mode = found.st_mode
  if stat.S_ISLNK(mode):
    return 'a symbolic link'
  if stat.S_ISDIR(mode):
    return 'a folder'
  if stat.S_ISFIFO(mode):
    return 'a FIFO'
  if stat.S_ISSOCK(mode):
    return 'a socket'
  if not stat.S_ISREG(mode):
    return 'a device'
  if found.st_nlink > 1:
    return f'a file with {found.st_nlink} links'
  return 'a file'


def planted(path: str) -> str | None:
  """What is at ``path`` if it is not a regular file of one link (a link,
  a FIFO, a folder, a hard link to another file), in words; None if there
  is nothing there or a plain file."""
  try:
    found = os.lstat(path)
  except FileNotFoundError:
    return None
  what = kind(found)
  return None if what == 'a file' else what


def remove(path: str) -> None:
  """Removes a file, a link (not what it leads to) or a folder with all it
  holds (links inside removed, never followed); nothing there is fine."""
  try:
    found = os.lstat(path)
  except FileNotFoundError:
    return
  if stat.S_ISDIR(found.st_mode):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


def create_new(path: str, mode: int = 0o600) -> BinaryIO:
  """A new file at ``path``, open for writing, with ``mode`` (less the
  umask) from its first byte.

  Raises:
    FileExistsError: anything is at ``path``, a dangling link included.
  """
  return os.fdopen(os.open(path, _NEW, mode), 'wb')


def rewrite(path: str, mode: int = 0o644) -> BinaryIO:
  """``path`` open for writing from its start: a new file, or an existing
  regular file of one link emptied (never a link's target, never a FIFO).

  Raises:
    PlantedError: a link, a FIFO, a folder or a file of several links is there.
  """
  try:
    fd = os.open(path, _REWRITE, mode)
  except OSError:
    what = planted(path)
    if what is not None:
      raise PlantedError(path, what) from None
    raise
  try:
    what = kind(os.fstat(fd))
    if what != 'a file':
      raise PlantedError(path, what)
    os.ftruncate(fd, 0)
    if _NONBLOCK:
      import fcntl

      fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
  except BaseException:
    os.close(fd)
    raise
  return os.fdopen(fd, 'wb')


class Folder:
  """A folder held by its descriptor: files and sub-folders are made and
  opened relative to it, never through a link planted in it."""

  def __init__(self, fd: int, path: str):
    self._fd = fd
    self.path = path

  @classmethod
  def open(cls, path: str) -> Folder:
    """The folder ``path``, a folder the caller chose (links on the way to
    it are followed; below it, ``folder`` follows none).

    Raises:
      PlantedError: ``path`` is not a folder.
    """
    try:
      return cls(os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC), path)
    except NotADirectoryError:
      raise PlantedError(path, kind(os.lstat(path))) from None

  def __enter__(self) -> Folder:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1

  def _path(self, name: str) -> str:
    return os.path.join(self.path, name)

  def folder(self, name: str, mode: int = 0o755) -> Folder:
    """The sub-folder ``name``, made if absent.

    Raises:
      PlantedError: a link or something other than a folder is there.
    """
    with contextlib.suppress(FileExistsError):
      os.mkdir(name, mode, dir_fd=self._fd)
    flags = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
    try:
      return Folder(os.open(name, flags, dir_fd=self._fd), self._path(name))
    except OSError as e:
      if e.errno not in (errno.ENOTDIR, errno.ELOOP):
        raise
      found = os.lstat(name, dir_fd=self._fd)
      raise PlantedError(self._path(name), kind(found)) from None

  @contextlib.contextmanager
  def writer(
    self, name: str, mode: int = 0o644, replace: bool = True
  ) -> Iterator[BinaryIO]:
    """A file to write ``name`` through: written under a fresh name of its
    own (``mode`` from its first byte) and put in place when the block ends
    (``put``); nothing is left of it if the block raises."""
    temp = f'.{name}.{secrets.token_hex(6)}.tmp'
    f = os.fdopen(os.open(temp, _NEW, mode, dir_fd=self._fd), 'wb')
    try:
      with f:
        yield f
      self.put(temp, name, replace)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(temp, dir_fd=self._fd)

  def write(
    self, name: str, data: bytes, mode: int = 0o644, replace: bool = True
  ) -> None:
    """Writes ``data`` as ``name``, whole or not at all (``writer``)."""
    with self.writer(name, mode, replace) as f:
      f.write(data)

  def put(self, source: str, name: str, replace: bool = True) -> None:
    """Gives the file ``source`` (of this folder) the name ``name``: with
    ``replace`` whatever is there is replaced (a link itself, not its target);
    without, nothing may be there. ``source`` is gone afterwards.

    Raises:
      FileExistsError: without ``replace``, something is at ``name``
        (``source`` is then kept).
    """
    fd = self._fd
    if replace:
      os.replace(source, name, src_dir_fd=fd, dst_dir_fd=fd)
      return
    try:
      os.link(source, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
    except FileExistsError:
      raise
    except OSError as e:  # no hard links here (some network or FAT file systems)
      if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
        raise
      self._copy_new(source, name)
    os.unlink(source, dir_fd=fd)

  def take(self, source: Folder, name: str, as_name: str | None = None) -> None:
    """Moves the file ``name`` of the folder ``source`` into this one, as
    ``as_name`` (default: ``name``), replacing whatever is there (a link
    itself, never its target): a rename between the two descriptors, so
    neither folder is looked up by its path again."""
    os.replace(name, as_name or name, src_dir_fd=source._fd, dst_dir_fd=self._fd)

  def _copy_new(self, source: str, name: str) -> None:
    """Copies ``source`` to a new file ``name`` (made exclusively)."""
    found = os.stat(source, dir_fd=self._fd, follow_symlinks=False)
    made = os.open(name, _NEW, stat.S_IMODE(found.st_mode), dir_fd=self._fd)
    with (
      os.fdopen(made, 'wb') as target,
      os.fdopen(os.open(source, os.O_RDONLY | _NOFOLLOW, dir_fd=self._fd), 'rb') as f,
    ):
      shutil.copyfileobj(f, target)
      target.flush()
      os.fsync(target.fileno())


def read_private(path: str, flag: str, limit: int = _SECRET_BYTES) -> bytes:
  """The first ``limit`` bytes of a secret's file (a key, credentials),
  which must be a regular file, not a link, that only its owner (this user,
  or root) may read or write: no read or write bit for its group or for
  others (mode 600 or 400).

  Args:
    path: the file.
    flag: the option that named it, for messages.

  Raises:
    UsageError: it is missing or unreadable, a link, a FIFO or another
      non-file, readable or writable by its group or every user, or another
      user's.
  """
  try:
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC)
  except OSError as e:
    what = planted(path)
    if what == 'a symbolic link':
      raise UsageError(
        f'{flag} {path} is a symbolic link: name the file itself'
      ) from None
    raise UsageError(f'{flag} {path}: {e.strerror or e}') from None
  with os.fdopen(fd, 'rb') as f:
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
      raise UsageError(f'{flag} {path} is not a regular file ({kind(found)})')
    if found.st_mode & _SHARED:
      raise UsageError(
        f'{flag} {path} may be read or written by its group or by every user '
        f'(mode {stat.S_IMODE(found.st_mode):o}): chmod 600 it'
      )
    if found.st_uid not in (os.geteuid(), 0):
      raise UsageError(
        f'{flag} {path} belongs to another user (uid {found.st_uid}), who may '
        'rewrite it'
      )
    try:
      return f.read(limit)
    except OSError as e:
      raise UsageError(f'{flag} {path}: {e.strerror or e}') from None
