"""What the console shows, and the run's log file, which keeps everything.

The console (stderr) gets the project's own lines from INFO up, also those of
worker processes (progress), which Beam's job service relays, and no
tracebacks: Beam's stage notes, its errors (the command line sums a failure up
in one line) and import-time warnings of optional clients ("apitools not
found ...") are not ours to show. Every line, tracebacks included, goes to the
log file, whose path the command line prints when something fails.

Importing this module does not import Beam, so logging is set up before Beam
is loaded and its import-time lines land in the file, not on the console.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable

# The driver-side logger through which Beam's local job service relays the
# log lines of worker processes (DirectRunner multi_processing, portable).
WORKER_LOGGER = 'apache_beam.runners.portability.local_job_service'
_OUR_PACKAGES = ('/beam_pipeline/', '/transforms/')
_OUR_LOGGERS = ('beam_pipeline', 'transforms', 'worker')
LOG_DIR_VARIABLE = 'CARDIAC_MRI_LOG_DIR'
_FORMAT = '%(asctime)s %(levelname)s %(name)s: %(message)s'


class WorkerLogFilter(logging.Filter):
  """Shows the project's own lines from worker processes; drops Beam's chatter.

  The job service relays each worker line as ``'Worker: %s'`` with the text of
  a LogEntry proto. Lines logged by our packages (progress, warnings about
  inputs) are rewritten to their plain message; Beam's own worker lines pass
  only from ERROR up (below that they are start-up notes such as
  "Discarding unparseable args").
  """

  def __init__(self):
    super().__init__()
    from apache_beam.portability.api import beam_fn_api_pb2
    from google.protobuf import text_format

    self._entry = beam_fn_api_pb2.LogEntry
    self._text_format = text_format

  def filter(self, record: logging.LogRecord) -> bool:
    if record.msg != 'Worker: %s' or len(record.args or ()) != 1:
      return record.levelno >= logging.WARNING
    try:
      entry = self._text_format.Parse(record.args[0], self._entry())
    except self._text_format.ParseError:
      return record.levelno >= logging.ERROR
    if any(package in entry.log_location for package in _OUR_PACKAGES):
      record.name, record.msg, record.args = 'worker', '%s', (entry.message,)
      return True
    return record.levelno >= logging.ERROR


def show_worker_logs() -> None:
  """Installs WorkerLogFilter on the job service's relay logger."""
  logger = logging.getLogger(WORKER_LOGGER)
  logger.setLevel(logging.INFO)
  if not any(isinstance(f, WorkerLogFilter) for f in logger.filters):
    logger.addFilter(WorkerLogFilter())


# ``extra=FILE_ONLY`` on a log call: the line goes to the log file only (the
# console already shows it another way, e.g. in the summary).
FILE_ONLY = {'file_only': True}


def _ours(record: logging.LogRecord) -> bool:
  """The console's rule: our own lines, without tracebacks (those are in the
  log file, as is everything Beam and other libraries log) and without the
  lines logged with FILE_ONLY."""
  return (
    record.name.split('.')[0] in _OUR_LOGGERS
    and not record.exc_info
    and not getattr(record, 'file_only', False)
  )


def log_path() -> str:
  """A new log file's path: in $CARDIAC_MRI_LOG_DIR, else in the user's own
  folder of the temp folder (``cardiac-mri-logs-<uid>``), made 0700 if new.
  A folder that is a symbolic link or another user's, or (the default one)
  that others may enter, is not used: the log file (which names patient ids
  without a key) then goes to a new private folder."""
  chosen = os.environ.get(LOG_DIR_VARIABLE)
  folder = chosen or os.path.join(
    tempfile.gettempdir(), f'cardiac-mri-logs-{os.getuid()}'
  )
  if not _own_folder(folder, private=not chosen):
    folder = tempfile.mkdtemp(prefix='cardiac-mri-logs-')
  stamp = time.strftime('%Y%m%d-%H%M%S')
  return os.path.join(folder, f'run-{stamp}-{os.getpid()}.log')


def _own_folder(folder: str, private: bool) -> bool:
  """Whether ``folder`` is (or is now made) a folder of this user's, not a
  symbolic link, and if ``private``, one nobody else may enter."""
  try:
    os.makedirs(folder, mode=0o700, exist_ok=True)
    status = os.lstat(folder)
  except OSError:
    return False
  return (
    stat.S_ISDIR(status.st_mode)
    and status.st_uid == os.getuid()
    and not (private and status.st_mode & 0o077)
  )


class _PrivateFileHandler(logging.FileHandler):
  """A log file created 0600 from its first byte, by this run: a new file
  (never one that was there, e.g. made by another user who guessed the
  name), never through a symbolic link; opened again (after a close) only
  as the regular file of one link this user owns."""

  _made = False

  def _open(self):
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
    if not self._made:
      while True:
        try:
          fd = os.open(self.baseFilename, flags | os.O_CREAT | os.O_EXCL, 0o600)
          break
        except FileExistsError:  # taken: another name beside it
          stem, _, _ = self.baseFilename.rpartition('.log')
          self.baseFilename = f'{stem}-{os.urandom(3).hex()}.log'
      self._made = True
    else:
      fd = os.open(self.baseFilename, flags)
    status = os.fstat(fd)
    if (
      not stat.S_ISREG(status.st_mode)
      or status.st_nlink != 1
      or status.st_uid != os.geteuid()
    ):
      os.close(fd)
      raise OSError(f'{self.baseFilename} is not a log file this pipeline made')
    os.set_blocking(fd, True)
    return open(fd, 'a', encoding=self.encoding, errors=self.errors)


_live_writer: Callable[[str], None] | None = None


def set_live_writer(writer: Callable[[str], None] | None) -> None:
  """While a live progress bar is drawn, console lines go through ``writer``
  (which prints them above the bar); None restores plain writes."""
  global _live_writer
  _live_writer = writer


class _ConsoleHandler(logging.StreamHandler):
  def emit(self, record: logging.LogRecord) -> None:
    writer = _live_writer
    if writer is None:
      super().emit(record)
      return
    try:
      writer(self.format(record))
    except Exception:
      self.handleError(record)


def configure_logging(path: str | None = None) -> str | None:
  """Console and log-file handlers on the root logger.

  Returns:
    The log file's path, or None if it cannot be created (then only the
    console is used).
  """
  console = _ConsoleHandler(sys.stderr)
  console.setLevel(logging.INFO)
  console.addFilter(_ours)
  console.setFormatter(logging.Formatter(_FORMAT))
  handlers: list[logging.Handler] = [console]
  path = path or log_path()
  try:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    log_file = _PrivateFileHandler(path, encoding='utf-8')  # made now
  except OSError:
    path = None
  else:
    path = log_file.baseFilename  # another name if that one was taken
    log_file.setLevel(logging.INFO)
    log_file.setFormatter(logging.Formatter(_FORMAT))
    handlers.append(log_file)
  logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
  logging.captureWarnings(True)
  threading.excepthook = _log_thread_exception
  return path


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
  """An exception that ends a thread (Beam's, when a run is stopped) goes to
  the log file, not to the console."""
  if args.exc_type is SystemExit:
    return
  logging.getLogger('threads').error(
    'exception in thread %s',
    args.thread.name if args.thread else '?',
    exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
  )


def route_child_stderr() -> None:
  """Points file descriptor 2 at a pipe whose lines go to the log file, and
  keeps the console for this process's own writes (``sys.stderr``).

  Processes the run starts inherit descriptor 2: Beam's worker processes
  print their own tracebacks there when Ctrl-C reaches the whole process
  group, and C libraries write notes there. Those lines belong in the log
  file. For the command line only (not for ``main()`` called in a process
  that has its own use of descriptor 2, such as a test runner).
  """
  console_fd = os.dup(2)
  read_fd, write_fd = os.pipe()
  os.dup2(write_fd, 2)
  os.close(write_fd)
  sys.stderr = open(console_fd, 'w', buffering=1, encoding='utf-8', errors='replace')
  threading.Thread(
    target=_copy_to_log, args=(read_fd,), name='child-stderr', daemon=True
  ).start()


def _copy_to_log(read_fd: int) -> None:
  log = logging.getLogger('stderr')
  with open(read_fd, encoding='utf-8', errors='replace') as lines:
    for line in lines:
      log.info('%s', line.rstrip('\n'))
