"""The command line: ``python run_pipeline.py [options]``, and its exit codes.

  0  the run completed and every input was used (problem rows that drop
     nothing, such as duplicates flagged, are in OUT/reconciliation);
  3  the run completed, and some inputs were not used: rows of OUT/errors, or
     of OUT/reconciliation that stand for an unused input
     (``transforms.contract.metrics.dropped_count``); the good slices are
     written;
  4  with --strict, any problem row, dropped or not: the run counts as failed
     (the reports are written);
  2  invalid options or input (nothing was launched), or an output or id
     map that another run changed meanwhile (nothing was published);
  1  the pipeline failed (crash): no version is committed;
  130, 143  interrupted by SIGINT (Ctrl-C) or SIGTERM: nothing is published
     (an interrupt during publishing waits for it to finish); more signals
     while the first is handled, or once the run has ended, change nothing.

``--help`` is answered before Beam, pydicom or pyarrow are imported.

The console command ``cardiac-mri`` (installed by setup.py) runs the pipeline
and its tools: ``cardiac-mri run|inspect|qa|verify|export|sample|problems|keygen|
history|vacuum ...``.
"""

from __future__ import annotations

import difflib
import logging
import signal
import sys
import time
from collections.abc import Sequence

from beam_pipeline.launch import arguments, console, interrupts
from beam_pipeline.tools import pipe
from transforms.contract.errors import UsageError, causes

_LOG = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DROPPED = 3
EXIT_STRICT = 4


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the pipeline from command-line arguments; returns the exit code."""
  started = time.monotonic()  # the summary's wall time counts from here
  argv = list(sys.argv[1:] if argv is None else argv)
  if '-h' in argv or '--help' in argv:
    command = sys.argv[0] if sys.argv[0].startswith('cardiac-mri') else ''
    arguments.help_parser(command or 'run_pipeline.py').print_help()
    return EXIT_OK
  if arguments.HELP_BEAM in argv:
    from beam_pipeline.launch import options

    pipe.out("Apache Beam's pipeline options (every runner's; this pipeline's too):")
    options.beam_parser().print_help()
    return EXIT_OK
  log_file = console.configure_logging()
  interrupts.handle_signals()
  try:
    run = _run(argv, started)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except (interrupts.Interrupted, Exception) as e:
    return _ended(e, log_file)
  if run.dry_run or not run.issues:
    return EXIT_OK
  if run.options.strict:
    return EXIT_STRICT
  return EXIT_DROPPED if run.dropped else EXIT_OK


def entry(argv: Sequence[str] | None = None) -> int:
  """``python run_pipeline.py`` and ``cardiac-mri run``: main() with the
  descriptor-level stderr of child processes routed to the log file, and
  glibc's malloc arenas capped before any thread starts
  (``transforms.tuning.limit_arenas``). An interrupted run ends the process
  at once (``interrupts.leave``): a thread blocked on a server is not
  waited for. Whatever main() lets out (an interrupt where it does not
  catch one) is one line and its exit code too, never a traceback."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a in argv for a in ('-h', '--help', arguments.HELP_BEAM)):
    from transforms import tuning

    tuning.limit_arenas()
    console.route_child_stderr()
  try:
    code = pipe.run(_main_then_hold, argv)
  except BaseException as e:  # came where main() does not catch it
    code = _ended(e, None)
  if code in interrupts.EXIT_CODES:
    interrupts.leave(code)
  return code


def _main_then_hold(argv: Sequence[str] | None) -> int:
  """main(); once it has ended, however, a signal is only recorded: the run
  is over (published or not), and its exit code stands."""
  try:
    return main(argv)
  finally:
    interrupts.stopping()


def _ended(e: BaseException, log_file: str | None) -> int:
  """The exit code of a run that ``e`` ended, and its one line on stderr:
  an interrupt (the first signal's; any later one, while this one is
  handled, is only recorded: ``interrupts.handle_signals``), or a failure."""
  stop = interrupts.interrupted_by(e)
  if stop is None and isinstance(e, KeyboardInterrupt):  # before the handlers
    stop = interrupts.Interrupted(signal.SIGINT)
  if stop is not None:
    interrupts.stopping()
    _LOG.info('interrupted by %s', stop, exc_info=True)  # the log file only
    interrupts.stop_descendants()
    later = [signal.Signals(s).name for s in interrupts.ignored()]
    if later:
      _LOG.info(
        'signals while the interrupt was handled, ignored: %s',
        ', '.join(later),
        extra=console.FILE_ONLY,
      )
    print(_interrupted(stop), file=sys.stderr)
    return stop.exit_code
  if _LOG.hasHandlers():  # else logging's last resort prints the traceback
    _LOG.error('the pipeline failed', exc_info=True)
  print(f'error: the pipeline failed: {_reason(e)}{_see(log_file)}', file=sys.stderr)
  return EXIT_FAILED


# The console command: `cardiac-mri COMMAND ...` (setup.py's entry point).
COMMANDS = {
  'run': 'run the pipeline (the options of run_pipeline.py; --help lists them)',
  'inspect': 'draw one slice with its contours to a PNG',
  'qa': 'write the QA page: overlays, flags and contact sheets',
  'verify': 'check an output: shards, schema, row counts, hashes',
  'sample': 'generate a synthetic data tree (the test-data generator)',
  'problems': "list a run's problem rows: inputs not used, duplicates flagged",
  'history': "list the dataset's versions (time, run, input, rows, change)",
  'vacuum': "remove old versions' files (--retain-hours H)",
  'keygen': 'write a new pseudonymisation key for --pseudonymize-key-file',
  'export': 'write NIfTI volumes in the nnU-Net raw layout (needs nibabel)',
}


def _usage() -> str:
  width = max(len(name) for name in COMMANDS)
  lines = [f'  {name:<{width}}  {text}' for name, text in COMMANDS.items()]
  return (
    'usage: cardiac-mri COMMAND [ARGS]\n\ncommands:\n'
    + '\n'.join(lines)
    + '\n\n`cardiac-mri COMMAND --help` describes one.'
  )


def _tool(name: str):
  """The main(argv) of a command other than run (imported when chosen)."""
  if name == 'inspect':
    from beam_pipeline.tools import overlay as tool
  elif name == 'qa':
    from beam_pipeline.tools import qa as tool
  elif name == 'verify':
    from beam_pipeline.tools import verify as tool
  elif name == 'sample':
    from beam_pipeline.tools import sample as tool
  elif name == 'keygen':
    from beam_pipeline.tools import keys as tool
  elif name == 'history':
    from beam_pipeline.tools import history as tool
  elif name == 'export':
    from beam_pipeline.tools import export as tool
  elif name == 'vacuum':
    from beam_pipeline.launch import vacuum as tool
  else:
    from beam_pipeline.tools import problems as tool
  return tool.main


def command(argv: Sequence[str] | None = None) -> int:
  """``cardiac-mri COMMAND [ARGS]``: the pipeline and its tools, one command
  (a closed stdout, as in ``cardiac-mri problems OUT | head -1``, stops the
  output only: ``pipe``)."""
  return pipe.run(_command, argv)


def _command(argv: Sequence[str] | None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help'):
    if not argv:
      print(_usage(), file=sys.stderr)
      return EXIT_USAGE
    pipe.out(_usage())
    return EXIT_OK
  name, args = argv[0], argv[1:]
  if name not in COMMANDS:
    close = difflib.get_close_matches(name, COMMANDS, n=1)
    hint = f'; did you mean {close[0]}?' if close else ''
    print(
      f'error: unknown command {name!r}{hint} (commands: {", ".join(COMMANDS)})',
      file=sys.stderr,
    )
    return EXIT_USAGE
  sys.argv[0] = f'cardiac-mri {name}'  # argparse's usage lines name the command
  if name == 'run':
    return entry(args)
  return pipe.run(_tool(name), args)


def _run(argv: list[str], started: float):
  from beam_pipeline.launch import run  # Beam: loaded after logging is set up

  console.show_worker_logs()
  return run.run(argv, started)


def _interrupted(e: interrupts.Interrupted) -> str:
  if e.published:
    return f'interrupted ({e}) after the new dataset was published; it is complete'
  return f'interrupted ({e}): nothing published, previous dataset untouched'


def _reason(e: BaseException) -> str:
  """One line: the innermost cause's type and message; an OSError that names
  its file is preferred to a deeper one that does not."""
  chain = causes(e)
  named = [x for x in chain if isinstance(x, OSError) and x.filename is not None]
  e = named[-1] if named else chain[-1]
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'.rstrip(': ')


def _see(log_file: str | None) -> str:
  return f' (full traceback in {log_file})' if log_file else ''
