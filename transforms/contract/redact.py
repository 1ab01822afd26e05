"""Text the pipeline did not write itself, made safe to show under a key.

With ``--pseudonymize-key-file``, every id, UID and path the pipeline builds
a message from is already a pseudonym. Text that comes from elsewhere is
not: a library's exception message (pydicom quotes the value it could not
read), a third-party log record (urllib3 logs the URL of every request it
retries, which names a patient folder or a study's UIDs), a traceback.
:func:`text` rewrites such text so that it can name no patient:

==========================  ==================================================
found                       shown
==========================  ==================================================
a URL                       its scheme and host: ``http://127.0.0.1:8042/<path>``
an absolute path            ``<path>``
a UID (4 or more numbers    ``<uid>``, except DICOM's own UIDs (``1.2.840.10008.``:
joined by dots)             transfer syntaxes, SOP classes), which name no one
a quoted value              its length: ``'<7 characters>'``
==========================  ==================================================

:class:`LogRedaction` applies it to every log record a run writes that is
not the project's own, and to every traceback. Pure but for the logging
handlers it is installed on.
"""

from __future__ import annotations

import logging
import re

# A URL, not the punctuation after it: (scheme://host)(the rest).
_URL = re.compile(
  r'\b([a-zA-Z][a-zA-Z0-9+.-]*://[^/\s\'"<>]*)(?:[^\s\'"<>]*[^\s\'"<>.,;:)\]])?'
)
_QUOTED = re.compile(r"'([^'\n]*)'|\"([^\"\n]*)\"")
# An absolute path: a "/" that starts a word (not one inside a URL or a name).
_ABSOLUTE_PATH = re.compile(r'(?<![\w:/.~<>-])/[^\s\'",;)<>]+')
_UID = re.compile(r'(?<![\w.])\d+(?:\.\d+){3,}(?![\w.])')
# DICOM's own UIDs (transfer syntaxes, SOP classes): they name no one.
_DICOM_UID = re.compile(r'1\.2\.840\.10008(?:\.(?:0|[1-9][0-9]*))*')
# The project's own loggers: their lines are built from pseudonymised values.
OWN_LOGGERS = ('beam_pipeline', 'transforms', 'worker')


def text(message: str, kept: tuple[str, ...] = ()) -> str:
  """``message`` with every URL, absolute path, UID and quoted value replaced
  as the module's table says; a quoted value or a UID that is one of
  ``kept`` (a pseudonym the message was given) stays."""
  hosts: list[str] = []  # kept apart: an IPv4 host looks like a UID

  def url(match: re.Match) -> str:
    hosts.append(match.group(1))
    tail = '/' if match.group(0).endswith('/') else ''  # what follows it
    return f'\0{len(hosts) - 1}\0/<path>{tail}'

  message = _URL.sub(url, message.replace('\0', ''))
  message = _ABSOLUTE_PATH.sub('<path>', message)
  message = _QUOTED.sub(lambda m: _quoted(m, kept), message)
  message = _UID.sub(lambda m: m.group(0) if m.group(0) in kept else _uid(m), message)
  return re.sub('\0([0-9]+)\0', lambda m: hosts[int(m.group(1))], message)


def _quoted(match: re.Match, kept: tuple[str, ...]) -> str:
  quote = match.group(0)[0]
  value = match.group(1) if match.group(1) is not None else match.group(2)
  if _DICOM_UID.fullmatch(value) or value in ('', '<path>', *kept):
    return match.group(0)
  return f'{quote}<{len(value)} characters>{quote}'


def _uid(match: re.Match) -> str:
  return match.group(0) if _DICOM_UID.fullmatch(match.group(0)) else '<uid>'


class LogRedaction(logging.Filter):
  """Rewrites, on the handler it filters, each record that is not the
  project's own (its message becomes :func:`text` of it), the exceptions
  the project's own records quote, and the traceback of every record. The
  record object is changed in place: every handler after this one shows the
  rewritten text."""

  def filter(self, record: logging.LogRecord) -> bool:
    if getattr(record, 'redacted', False):
      return True
    if record.name.split('.')[0] not in OWN_LOGGERS:
      try:
        message = record.getMessage()
      except Exception:  # a record whose arguments do not fit its format
        message = str(record.msg)
      record.msg, record.args = text(message), ()
    elif isinstance(record.args, tuple) and any(
      isinstance(arg, BaseException) for arg in record.args
    ):  # ours, quoting a library's exception
      record.args = tuple(
        text(str(arg)) if isinstance(arg, BaseException) else arg for arg in record.args
      )
    if record.exc_info and not record.exc_text:  # formatters use exc_text
      record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
      record.exc_text = text(record.exc_text)
    if record.stack_info:
      record.stack_info = text(record.stack_info)
    record.redacted = True
    return True


def install(handlers: list[logging.Handler] | None = None) -> None:
  """Puts one LogRedaction on each of ``handlers`` (default: the root
  logger's, which every propagating logger's records reach)."""
  for handler in logging.getLogger().handlers if handlers is None else handlers:
    if not any(isinstance(f, LogRedaction) for f in handler.filters):
      handler.addFilter(LogRedaction())
