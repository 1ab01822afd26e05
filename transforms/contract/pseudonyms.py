"""Keyed pseudonyms for what identifies a patient: ids, UIDs and path names.

With a key (``--pseudonymize-key-file``), each value becomes a keyed
HMAC-SHA256 of itself, with a domain per kind of value, so a pseudonym
cannot be reversed or guessed without the key (an unkeyed hash of an MRN
can: there are few MRNs), the same key always gives the same pseudonym, and
equal values stay equal (the joins and the study/series grouping survive):

==============  =========================  ==================================
value           pseudonym                  e.g.
==============  =========================  ==================================
patient_id      ``P`` + 20 base32 chars    ``PZK4VQ2M7XH3D5ELW6RNA``
original_id     ``O`` + 20 base32 chars    ``O2HT6B...``
a path name     ``N`` + 20 base32 chars    a folder or file name that is not
                                           one of the layout's own
a UID           ``2.25.`` + a 128-bit int  ``2.25.2795...`` (at most 44
                                           characters; PS3.5 B.2)
==============  =========================  ==================================

100 bits of HMAC make a collision between two ids of one dataset
improbable beyond concern (about 1 in 10^18 at a million ids).

Without a key, every function returns its input: ``IDENTITY``.

Pure: no I/O (the key file is read by ``beam_pipeline.tools.keys``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterator
from typing import NamedTuple

from transforms.contract import layout, redact

KEY_BYTES = 32  # the shortest key accepted: 256 bits, SHA-256's own size
_ID_CHARS = 20  # base32 characters: 100 bits
_UID_ROOT = '2.25.'  # a UUID-derived UID (PS3.5 B.2): no registered root needed

# A PACS instance's path (dicomweb.Instance.path): its UIDs are replaced.
_PACS_PATH = re.compile(r'studies/([^/]+)/series/([^/]+)/instances/([^/]+)')
# What scrub shows for an absolute path, and the text it never rewrites: the
# layout's templates quoted in messages, and that mark itself.
_WITHHELD = '<path>'
_KEPT = re.compile(
  '('
  + '|'.join(
    re.escape(t) for t in sorted((*layout.TEMPLATES, _WITHHELD), key=len, reverse=True)
  )
  + ')'
)


class Entry(NamedTuple):
  """One row of the id map: a value and its pseudonym."""

  kind: str  # one of KINDS
  original: str
  pseudonym: str


PATIENT_ID = 'patient_id'
ORIGINAL_ID = 'original_id'
NAME = 'name'
UID = 'uid'
KINDS = (PATIENT_ID, ORIGINAL_ID, NAME, UID)


class Pseudonyms:
  """The pseudonyms of one key (or none: ``IDENTITY``).

  Picklable, so that it reaches every worker with the DoFns that use it;
  its repr never shows the key.
  """

  def __init__(self, key: bytes | None = None, mapped: bool = False):
    """``mapped``: the stages also emit the id-map rows of what they
    replace (--id-map); without it they spend nothing on them."""
    if key is not None and len(key) < KEY_BYTES:
      raise ValueError(f'a pseudonymisation key has at least {KEY_BYTES} bytes')
    self._key = key
    self.mapped = mapped and key is not None

  def __repr__(self) -> str:
    return f'Pseudonyms({"keyed" if self._key else "none"})'

  def __eq__(self, other) -> bool:
    return (
      isinstance(other, Pseudonyms)
      and other._key == self._key
      and other.mapped == self.mapped
    )

  def __hash__(self) -> int:
    return hash((self._key, self.mapped))

  @property
  def active(self) -> bool:
    """True when values are replaced (a key was given)."""
    return self._key is not None

  def with_map(self) -> Pseudonyms:
    """The same pseudonyms, with their id-map rows emitted."""
    return Pseudonyms(self._key, mapped=True)

  def _digest(self, domain: str, value: str) -> bytes:
    message = domain.encode() + b'\0' + value.encode('utf-8', 'surrogateescape')
    return hmac.new(self._key, message, hashlib.sha256).digest()

  def _text(self, prefix: str, domain: str, value: str) -> str:
    if self._key is None:
      return value
    encoded = base64.b32encode(self._digest(domain, value)).decode()
    return prefix + encoded[:_ID_CHARS]

  def patient(self, patient_id: str) -> str:
    """The pseudonym of a patient_id (a dicoms/ folder name)."""
    return self._text('P', PATIENT_ID, patient_id) if patient_id else patient_id

  def original(self, original_id: str) -> str:
    """The pseudonym of an original_id (a contourfiles/ folder name)."""
    return self._text('O', ORIGINAL_ID, original_id) if original_id else original_id

  def name(self, name: str) -> str:
    """A path name as shown: kept when it is one of the layout's own names
    (``48.dcm``, ``i-contours``), else replaced (it may carry an id)."""
    if self._key is None or not name or layout.is_layout_name(name):
      return name
    return self._text('N', NAME, name)

  def uid(self, uid: str | None) -> str | None:
    """The pseudonym of a UID: ``2.25.`` and the HMAC's first 128 bits."""
    if self._key is None or not uid:
      return uid
    return _UID_ROOT + str(int.from_bytes(self._digest(UID, uid)[:16], 'big'))

  def _owner(self, top: str):
    """(kind, pseudonym function) of the owner folder under ``top``: a
    patient_id under dicoms/, an original_id under contourfiles/."""
    if top == layout.DICOM_DIR:
      return PATIENT_ID, self.patient
    if top == layout.CONTOUR_DIR:
      return ORIGINAL_ID, self.original
    return NAME, self.name

  def path(self, relative: str) -> str:
    """A path under the input root as shown: the owner folder
    (``dicoms/<patient_id>``, ``contourfiles/<original_id>``) by its id's
    pseudonym, every other name by :meth:`name`."""
    if self._key is None:
      return relative
    if match := _PACS_PATH.fullmatch(relative):
      study, series, sop = (self.uid(u) for u in match.groups())
      return f'studies/{study}/series/{series}/instances/{sop}'
    parts = relative.split('/')
    shown_parts = [self.name(parts[0])]
    if len(parts) > 1:
      shown_parts.append(self._owner(parts[0])[1](parts[1]))
    shown_parts += [self.name(part) for part in parts[2:]]
    return '/'.join(shown_parts)

  def entries(self, relative: str, shown_path: str | None = None) -> list[Entry]:
    """The id-map rows of the ids, names and UIDs that :meth:`path` replaces
    in ``relative``; ``shown_path``: that path, if already made."""
    if self._key is None:
      return []
    shown_path = self.path(relative) if shown_path is None else shown_path
    parts = relative.split('/')
    pacs = _PACS_PATH.fullmatch(relative) is not None
    entries = []
    for k, (part, pseudonym) in enumerate(
      zip(parts, shown_path.split('/'), strict=True)
    ):
      if part != pseudonym:
        kind = UID if pacs else self._owner(parts[0])[0] if k == 1 else NAME
        entries.append(Entry(kind, part, pseudonym))
    return entries

  def listed(
    self, file: layout.DicomFile | layout.ContourFile | layout.StrayFile
  ) -> layout.DicomFile | layout.ContourFile | layout.StrayFile:
    """A listed file as shown: ids by their pseudonyms, the path by
    :meth:`path` (the path as listed kept in ``source`` to read it), a stray
    file's reason without the path as listed."""
    if self._key is None:
      return file
    shown_path = self.path(file.path)
    if isinstance(file, layout.DicomFile):
      pid = self.patient(file.patient_id)
      return file._replace(patient_id=pid, path=shown_path, source=file.path)
    if isinstance(file, layout.ContourFile):
      oid = self.original(file.original_id)
      return file._replace(original_id=oid, path=shown_path, source=file.path)
    _, show_owner = self._owner(file.path.split('/')[0])
    reason = self.scrub(file.reason, file.path, shown_path)
    return layout.StrayFile(show_owner(file.owner_id), shown_path, reason)

  def scrub(self, text: str, real: str, pseudonym: str) -> str:
    """``text`` (a message that may quote a path: an OSError's, a server's)
    with ``real`` replaced by ``pseudonym``, and, under a key, the rest
    redacted (``redact.text``): every absolute path it still quotes (the
    input root joined to the shown path, where a symlink leads) becomes
    ``<path>``, as such a path may hold any name, a URL its scheme and host,
    a UID ``<uid>``, a quoted value (a library quoting what it could not
    read) its length.

    ``real`` is a path (it holds a ``/``: replaced wherever it appears) or an
    id, replaced only where it stands as a word or path component of its
    own (no letter, digit, ``_``, ``-`` or ``.`` touches it; a ``.`` that
    ends a sentence may follow it), so that an id such as ``1`` or ``p``
    is not replaced inside other words, numbers or UIDs (``HTTP 401``,
    ``1.2.840``, ``input``). The layout's
    templates (``layout.TEMPLATES``, e.g. ``dicoms/<patient_id>/<n>.dcm``)
    are never rewritten, whatever ids collide with their words.
    """
    if self._key is None:
      return text
    quoted = None
    if real and real != pseudonym:
      escaped = re.escape(real)
      if '/' not in real:
        escaped = rf'(?<![\w.-]){escaped}(?![\w-])(?!\.\w)'
      quoted = re.compile(escaped)
    pieces = _KEPT.split(text)  # the kept text at odd indices
    for k in range(0, len(pieces), 2):
      piece = (
        pieces[k] if quoted is None else quoted.sub(lambda _: pseudonym, pieces[k])
      )
      pieces[k] = redact.text(piece, kept=(pseudonym,))
    return ''.join(pieces)


IDENTITY = Pseudonyms()


class Recent:
  """The id-map rows a worker sent lately (at most ``size``), so that a
  patient's id or a study's UID is not sent once per file; the pipeline
  keeps each row once whatever is sent twice."""

  def __init__(self, size: int = 10_000):
    self._size = size
    self._sent: set[Entry] = set()

  def fresh(self, entries: list[Entry]) -> Iterator[Entry]:
    """Those of ``entries`` not sent lately (now counted as sent)."""
    for entry in entries:
      if entry not in self._sent:
        if len(self._sent) >= self._size:
          self._sent.clear()
        self._sent.add(entry)
        yield entry
