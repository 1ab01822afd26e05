"""One run at a time per output (``OUT/_LOCK``) and per id map
(``{--id-map}.lock``, ``hold_file``).

A run holds the lock from before it looks at the output until its dataset is
published (or it fails or is interrupted). The lock file records the
holder's pid, host, start time and run id; a second run refuses with one
line naming the holder (exit 2).

Locally the lock is an advisory ``flock`` on ``OUT/_LOCK``, which the kernel
releases when the holder dies however it dies: a lock file left by a killed
run is taken over with a warning, never waited on. The file is checked to
still be the one at that path after locking, so a run that opened it just
before the holder deleted it cannot hold a lock nobody sees. The file is
opened without following a symbolic link and must be a regular file: a link
or a FIFO planted as ``OUT/_LOCK`` (anyone who may write in a shared output
folder could plant one) is refused (exit 2), so a run never truncates and
rewrites another file through it. The id map's lock (``keys.lock_path``) is
the same kind of file, held from before the job's parts are made until the
map is in place, so two runs of two outputs never write one map.

On an object store (no flock) the lock is an object made by a conditional
create (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``), so of two runs
starting together exactly one gets it. A lock younger than STALE_HOURS is
refused; an older one (its run died without releasing it) is taken over with
a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket
import stat
import time
import uuid
from collections.abc import Iterator

from transforms.contract.errors import UsageError
from transforms.io import stores
from transforms.io.protocol import is_local

_LOG = logging.getLogger(__name__)

LOCK_FILE = '_LOCK'
STALE_HOURS = 24.0  # an object-store lock older than this is taken over


def _holder(run_id: str) -> dict:
  return {
    'pid': os.getpid(),
    'host': socket.gethostname(),
    'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'
    ),
    'run_id': run_id,
  }


def _describe(holder: dict) -> str:
  return (
    f'pid {holder.get("pid", "?")} on {holder.get("host", "?")} since '
    f'{holder.get("started", "?")}'
  )


def _parse(data: bytes) -> dict:
  try:
    holder = json.loads(data)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def hold(output: str, run_id: str) -> Iterator[None]:
  """Holds the lock of ``output`` (an existing folder, or an object-store
  prefix) for the ``with`` block.

  Raises:
    UsageError: another run holds it.
  """
  if is_local(output):
    with _hold_local(output, run_id):
      yield
  else:
    with _hold_remote(output, run_id):
      yield


@contextlib.contextmanager
def _hold_local(output: str, run_id: str) -> Iterator[None]:
  with hold_file(
    os.path.join(output, LOCK_FILE), run_id, f'--output {output}', 'output'
  ):
    yield


@contextlib.contextmanager
def hold_file(path: str, run_id: str, named: str, what: str) -> Iterator[None]:
  """Holds the local lock file ``path`` (made if absent) for the ``with``
  block, and removes it at the end; the kernel lets go of it when the holder
  dies, however it dies.

  Args:
    path: the lock file (``OUT/_LOCK``, ``{id map}.lock``).
    run_id: the holder's run, recorded in the file.
    named: the option and value it guards, for messages (``--output OUT``).
    what: what it guards, in words (``output``, ``id map``).

  Raises:
    UsageError: another run holds it, or ``path`` is not a lock file this
      pipeline made (a link, a FIFO, a file of several links).
  """
  flag = named.split(' ', 1)[0]
  while True:
    fd = _open_lock(path, named, what)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _parse(os.pread(fd, 4096, 0))
      os.close(fd)
      raise UsageError(
        f'{named} is in use by another run ({_describe(holder)}; '
        f'{path}); wait for it to finish, or choose another {flag}'
      ) from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # the holder removed it as we opened it: lock the new one
  try:
    left = _parse(os.pread(fd, 4096, 0))
    if left:
      _LOG.warning(
        'taking over the lock of %s left by a run that is no longer running (%s)',
        named.split(' ', 1)[-1],
        _describe(left),
      )
    with contextlib.suppress(OSError):  # one left by an older release: 0644
      os.fchmod(fd, 0o600)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder(run_id)).encode(), 0)
    yield
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)  # while still locked: the next run finds no file
    os.close(fd)


# No symbolic link followed, no wait on a FIFO, not inherited by children.
_LOCK_FLAGS = (
  os.O_RDWR
  | os.O_CREAT
  | getattr(os, 'O_NOFOLLOW', 0)
  | getattr(os, 'O_NONBLOCK', 0)
  | getattr(os, 'O_CLOEXEC', 0)
)


def _open_lock(path: str, named: str, what: str) -> int:
  """The lock file, opened (made if absent) as a regular file of its own.

  Raises:
    UsageError: the path is a symbolic link or not a regular file.
  """
  refusal = (
    f'{named}: {path} is not a lock file this pipeline made (%s); '
    f'remove it if no run is using this {what}'
  )
  try:
    fd = os.open(path, _LOCK_FLAGS, 0o600)  # its run id is no one else's
  except OSError as e:
    if os.path.islink(path):
      raise UsageError(refusal % 'a symbolic link') from None
    raise UsageError(f'{named}: cannot open {path}: {e.strerror}') from e
  found = os.fstat(fd)
  if not stat.S_ISREG(found.st_mode):
    os.close(fd)
    raise UsageError(refusal % 'not a regular file')
  if found.st_nlink > 1:  # a hard link to some other file
    os.close(fd)
    raise UsageError(refusal % f'a file with {found.st_nlink} links')
  return fd


@contextlib.contextmanager
def _hold_remote(output: str, run_id: str) -> Iterator[None]:
  path = stores.join(output, LOCK_FILE)
  store = stores.store(path)
  mine = json.dumps(_holder(run_id)).encode()
  if not store.create_exclusive(path, mine):
    try:
      holder = _parse(store.read(path))
    except FileNotFoundError:  # released as we looked: one more try
      holder = {'started': None}
    started = holder.get('started')
    try:
      age = time.time() - datetime.datetime.fromisoformat(started).timestamp()
    except (TypeError, ValueError):
      age = float('inf')
    if age < STALE_HOURS * 3600:
      raise UsageError(
        f'--output {output} is in use by another run ({_describe(holder)}; '
        f'{path}); wait for it to finish, or choose another --output'
      )
    if holder.get('run_id'):
      _LOG.warning(
        'taking over the lock of %s, older than %g hours (%s)',
        output,
        STALE_HOURS,
        _describe(holder),
      )
      store.delete([path])
    if not store.create_exclusive(path, mine):
      raise UsageError(f'--output {output} was locked by another run just now')
  try:
    yield
  finally:
    with contextlib.suppress(Exception):
      if _parse(store.read(path)).get('run_id') == run_id:
        store.delete([path])


def holder(output: str) -> str | None:
  """Who holds the lock of the local folder ``output`` now (``pid N on HOST
  since T``, with ``?`` for what cannot be read; a path that is not a lock
  file this pipeline made counts as held), or None when no process holds it
  (no lock file, or one that a dead run left). Takes nothing: a shared lock
  is tried and at once released."""
  path = os.path.join(output, LOCK_FILE)
  flags = os.O_RDONLY | (_LOCK_FLAGS & ~(os.O_RDWR | os.O_CREAT))
  try:
    fd = os.open(path, flags)
  except FileNotFoundError:
    return None
  except OSError:
    return _describe({})
  try:
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode) or found.st_nlink > 1:
      return _describe({})
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return _describe(_parse(os.pread(fd, 4096, 0)))
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None
  finally:
    os.close(fd)


def new_run_id() -> str:
  return f'{time.strftime("%Y%m%d-%H%M%S")}-{uuid.uuid4().hex[:8]}'
