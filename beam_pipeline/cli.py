"""The command line: ``python run_pipeline.py [options]``, and its exit codes.

  0  the run completed and every input was used;
  3  the run completed, and some inputs are in OUT/errors or OUT/reconciliation
     has problem rows (the good slices are written);
  4  as 3, with --strict: the run counts as failed (the reports are written);
  2  invalid options or input (nothing was launched);
  1  the pipeline failed (crash): OUT/_SUMMARY.json is not written.

``--help`` is answered before Beam, pydicom or pyarrow are imported.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from beam_pipeline import arguments, console
from beam_pipeline.contract.errors import UsageError

_LOG = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_QUARANTINED = 3
EXIT_STRICT = 4


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the pipeline from command-line arguments; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if '-h' in argv or '--help' in argv:
    arguments.help_parser().print_help()
    return EXIT_OK
  if arguments.HELP_BEAM in argv:
    from beam_pipeline import options

    print("Apache Beam's pipeline options (every runner's; this pipeline's too):")
    options.beam_parser().print_help()
    return EXIT_OK
  log_file = console.configure_logging()
  from beam_pipeline import pipeline  # Beam: loaded after logging is set up

  console.show_worker_logs()
  try:
    run = pipeline.run(argv)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except Exception as e:
    _LOG.error('the pipeline failed', exc_info=True)
    print(f'error: the pipeline failed: {_reason(e)}{_see(log_file)}', file=sys.stderr)
    return EXIT_FAILED
  if run.dry_run or not run.issues:
    return EXIT_OK
  return EXIT_STRICT if run.options.strict else EXIT_QUARANTINED


def _reason(e: BaseException) -> str:
  """One line: the innermost cause's type and message."""
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'.rstrip(': ')


def _see(log_file: str | None) -> str:
  return f' (full traceback in {log_file})' if log_file else ''
