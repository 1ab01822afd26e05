"""A command's standard output, which a reader that goes away does not turn
into a traceback: ``cardiac-mri problems OUT | head -1``.

Once the reader of a pipe has closed it, Python raises BrokenPipeError at the
next write to stdout, and again when it flushes what is left at exit (a
traceback, then "Exception ignored ... BrokenPipeError" and exit 120). Every
command prints its stdout lines through :func:`out` and runs through
:func:`run`: when the pipe is closed, stdout is pointed at ``os.devnull``,
the command finishes what it does, prints nothing more, and exits with the
code it would have had (the work is the same, only the lines are lost).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

# A BrokenPipeError that escaped the command itself: it may not have
# finished, so the code it would have had is unknown.
EXIT_UNFINISHED = 1


def _closed() -> None:
  """Points stdout at os.devnull: what is still buffered, and every later
  line, goes nowhere."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, sys.stdout.fileno())
  except (AttributeError, OSError, ValueError):  # not a file: drop the stream
    sys.stdout = open(os.devnull, 'w')  # noqa: SIM115 - lives as stdout
  finally:
    os.close(devnull)


def out(text: str = '') -> None:
  """Prints ``text`` on stdout; once its reader is gone, nothing."""
  try:
    print(text)
  except BrokenPipeError:
    _closed()


def flush() -> None:
  """Flushes stdout; once its reader is gone, drops what is left."""
  try:
    sys.stdout.flush()
  except BrokenPipeError:
    _closed()
    try:
      sys.stdout.flush()  # the rest of the buffer, now to os.devnull
    except OSError:
      pass


def run(main: Callable[[Sequence[str] | None], int | None], argv=None) -> int:
  """``main(argv)``'s exit code (0 for None), stdout flushed before it is
  returned, so that a closed pipe is neither a traceback nor a different
  code (argparse's own exit, as for ``--help``, counts as main's)."""
  try:
    code = main(argv)
  except SystemExit as e:
    code = e.code
    if code is not None and not isinstance(code, int):  # as the interpreter does
      print(code, file=sys.stderr)
      code = 1
  except BrokenPipeError:
    _closed()
    code = EXIT_UNFINISHED
  flush()
  return code or 0
