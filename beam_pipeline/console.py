"""What the console shows: our log lines and those of worker processes.

Beam logs every stage at INFO; the console keeps to the project's own lines,
also those of worker processes (progress), which Beam's job service relays.
"""

from __future__ import annotations

import logging
import sys

from apache_beam.portability.api import beam_fn_api_pb2
from google.protobuf import text_format

# The driver-side logger through which Beam's local job service relays the
# log lines of worker processes (DirectRunner multi_processing, portable).
WORKER_LOGGER = 'apache_beam.runners.portability.local_job_service'
_OUR_PACKAGES = ('/beam_pipeline/', '/transforms/')


class WorkerLogFilter(logging.Filter):
  """Shows the project's own lines from worker processes; drops Beam's chatter.

  The job service relays each worker line as ``'Worker: %s'`` with the text of
  a LogEntry proto. Lines logged by our packages (progress, warnings about
  inputs) are rewritten to their plain message; Beam's own worker lines pass
  only from ERROR up (below that they are start-up notes such as
  "Discarding unparseable args").
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if record.msg != 'Worker: %s' or len(record.args or ()) != 1:
      return record.levelno >= logging.WARNING
    try:
      entry = text_format.Parse(record.args[0], beam_fn_api_pb2.LogEntry())
    except text_format.ParseError:
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


def configure_logging() -> None:
  """INFO lines of the project on stderr; Beam's own from WARNING up."""
  logging.basicConfig(
    level=logging.INFO,
    stream=sys.stderr,
    format='%(asctime)s %(levelname)s %(name)s: %(message)s',
    force=True,
  )
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  show_worker_logs()
