"""The input layout: where files live in a data tree and how their names parse.

A data tree looks like this::

    DATA/link.csv                      header "patient_id,original_id"
    DATA/dicoms/<patient_id>/<n>.dcm   one slice per file, n = 1, 2, 3 ...
    DATA/contourfiles/<original_id>/i-contours/IM-0001-<nnnn>-icontour-manual.txt
    DATA/contourfiles/<original_id>/o-contours/IM-0001-<nnnn>-ocontour-manual.txt

It also declares the records the stages hand each other (ids and paths only,
never pixels): Link, DicomFile, ContourFile and StrayFile from the listing
(which hands the files on in FileGroups, one element per folder rather than
one per file), Patient from the reconciliation.

Everything here is pure: no I/O, so it is tested without a pipeline.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import xxhash

from transforms.contract import packing, splits
from transforms.contract.schema import DUPLICATE_LINK, MALFORMED_LINK

LINK_FILE = 'link.csv'
DICOM_DIR = 'dicoms'
CONTOUR_DIR = 'contourfiles'
LINK_HEADER = ('patient_id', 'original_id')
CONTOUR_KINDS = ('i', 'o')
# The most link.csv may hold: some 500,000 patients at 30 bytes a row. Every
# reader (the listing, the launcher's survey) reads at most one byte more;
# parsing a file this size takes seconds and a few hundred MB.
MAX_LINK_BYTES = 16 * 1024 * 1024
# Problem rows of link.csv listed one by one, per status; one more row counts
# the rest, so a file of repeated rows costs 101 rows, not one per repeat.
LISTED_LINK_PROBLEMS = 100

# Ids name folders, so they are restricted to characters that cannot form a
# path of their own: no separators, no "..", no control characters.
_ID_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]*')
_DICOM_NAME_RE = re.compile(r'([1-9][0-9]*)\.dcm')
_CONTOUR_NAME_RE = re.compile(r'IM-0001-([0-9]{4})-([io])contour-manual\.txt')
_MAX_ID_LENGTH = 128
# The layout as its messages quote it: templates, not ids (pseudonyms.scrub
# never rewrites them, whatever ids collide with their words).
DICOM_PLACE = f'{DICOM_DIR}/<patient_id>/<n>.dcm'
DICOM_NAME = '<n>.dcm'
CONTOUR_PLACE = f'{CONTOUR_DIR}/<original_id>/[io]-contours/<file>'
CONTOUR_NAME = 'IM-0001-<nnnn>-[io]contour-manual.txt'
TEMPLATES = (DICOM_PLACE, CONTOUR_PLACE, DICOM_NAME, CONTOUR_NAME)


class IdPseudonyms(Protocol):
  """What parse_links needs of pseudonyms.Pseudonyms (which imports this
  module, so it is named here by its shape)."""

  @property
  def active(self) -> bool: ...

  def patient(self, patient_id: str) -> str: ...

  def original(self, original_id: str) -> str: ...


class Link(NamedTuple):
  """One usable row of link.csv.

  Under pseudonymisation the ids are pseudonyms; ``source_id`` keeps the
  patient_id as written, for what must ask by it (a PACS search), and
  ``position`` fixes the split from it (splits.patient_position), so that
  pseudonyms never move a patient to another split. Neither is output.
  """

  patient_id: str
  original_id: str
  line: int
  source_id: str = ''  # '': the patient_id is as written
  position: float | None = None  # None: from patient_id

  def __repr__(self) -> str:  # never the id as written (tracebacks, logs)
    return f'Link({self.patient_id!r}, {self.original_id!r}, line {self.line})'

  @property
  def query_id(self) -> str:
    """The patient_id as written in link.csv."""
    return self.source_id or self.patient_id


class LinkProblem(NamedTuple):
  """A row of link.csv that cannot be used, with the reconciliation status."""

  patient_id: str
  original_id: str
  status: str  # MALFORMED_LINK or DUPLICATE_LINK
  detail: str


class DicomFile(NamedTuple):
  """A slice file, ``dicoms/<patient_id>/<slice_index>.dcm``.

  ``path`` is how the file is shown (pseudonymised, if so); ``source``, if
  set, is where it is read (never output). ``stamp`` is what the listing
  learnt of the file's content without reading it (size and times on a
  disk, the ETag or generation on an object store; see ``fingerprint``).
  """

  patient_id: str
  slice_index: int
  path: str
  source: str = ''  # '': read at path
  stamp: str = ''  # what the listing knows of its content ('': nothing)

  def __repr__(self) -> str:
    return f'DicomFile({self.path!r})'

  @property
  def read_path(self) -> str:
    """Where the file is read."""
    return self.source or self.path


class ContourFile(NamedTuple):
  """A contour file of kind ``i`` (inner) or ``o`` (outer); ``path`` and
  ``source`` as for DicomFile."""

  original_id: str
  kind: str
  slice_index: int
  path: str
  source: str = ''  # '': read at path
  stamp: str = ''  # as for DicomFile

  def __repr__(self) -> str:
    return f'ContourFile({self.path!r})'

  @property
  def read_path(self) -> str:
    """Where the file is read."""
    return self.source or self.path


class StrayFile(NamedTuple):
  """A file under ``dicoms/`` or ``contourfiles/`` that the layout has no place for."""

  owner_id: str
  path: str
  reason: str


class FileGroup(NamedTuple):
  """Listed files of one owner: a patient's DicomFiles or an original id's
  ContourFiles, as the listing found them, packed (``packing``). The stages
  hand the listing on in groups, so what waits in the reconciliation's joins
  is one small element per folder, not a record per file; an owner's files
  may arrive in several groups."""

  owner_id: str
  packed: bytes

  @classmethod
  def of(cls, owner_id: str, files) -> FileGroup:
    """A group of ``files`` (DicomFiles or ContourFiles) of ``owner_id``."""
    return cls(owner_id, packing.pack(tuple(files)))

  @property
  def files(self) -> tuple:
    """The group's DicomFiles or ContourFiles, in listing order."""
    return packing.unpack(self.packed)

  def __repr__(self) -> str:
    return f'FileGroup({self.owner_id!r}, {len(self.files)} files)'


class Patient(NamedTuple):
  """A matched patient: its slices and, per slice, its contour paths."""

  patient_id: str
  original_id: str
  slices: tuple[DicomFile, ...]  # sorted by slice_index
  contours: tuple[ContourFile, ...]  # only those with a slice
  position: float | None = None  # see Link.position
  fingerprint: str = ''  # of its inputs (see fingerprint); '': unknown
  assigned: str = ''  # its split by splits.assign; '': not yet assigned

  def split(self, fractions: tuple[float, float, float]) -> str:
    """The patient's split before duplicate detection moves any: the one
    assigned to it, else its hash split."""
    if self.assigned:
      return self.assigned
    return splits.patient_split(self.patient_id, self.position, fractions)

  def split_position(self) -> float:
    """Where the patient's hash puts it (splits.patient_position)."""
    if self.position is not None:
      return self.position
    return splits.patient_position(self.patient_id)


# A file changed less than this long before it was listed may change again
# within the same timestamp (file systems keep times in steps of up to 2 s):
# its stamp says nothing, as in git's "racily clean" entries.
RACY_NS = 2_000_000_000
# The stamp of a PACS instance: a SOP Instance UID never names other content.
INSTANCE_STAMP = 'instance'


def disk_stamp(size: int, mtime_ns: int, ctime_ns: int, now_ns: int) -> str:
  """A local file's stamp: its size and modification and change times (the
  change time moves on any write and cannot be set back), or '' when either
  time is within RACY_NS of ``now_ns``, the instant it was listed."""
  if now_ns - max(mtime_ns, ctime_ns) < RACY_NS:
    return ''
  return f'{size}:{mtime_ns}:{ctime_ns}'


def fingerprint(
  link: tuple[str, str, float | None],
  slices: Iterable[DicomFile],
  contours: Iterable[ContourFile],
) -> str:
  """A digest of everything a patient's rows are made from: its link row
  (patient_id, original_id, split position), and each slice and contour
  file by path and stamp. '' when a file has no stamp: such a patient is
  always decoded again."""
  parts = [repr(link)]
  for file in (*slices, *contours):
    if not file.stamp:
      return ''
    parts.append(f'{file.path}\0{file.stamp}')
  return xxhash.xxh3_64_hexdigest('\n'.join(parts).encode())


def id_problem(value: str) -> str | None:
  """Says why ``value`` cannot be a patient or original id, or None if it can."""
  if not value:
    return 'is empty'
  if len(value) > _MAX_ID_LENGTH:
    return f'is longer than {_MAX_ID_LENGTH} characters'
  if not _ID_RE.fullmatch(value):
    return (
      'may hold only letters, digits, ".", "_" and "-", and must start with '
      'a letter or digit'
    )
  return None


def oversized_links() -> LinkProblem:
  """The problem of a link.csv larger than MAX_LINK_BYTES."""
  return LinkProblem(
    '',
    '',
    MALFORMED_LINK,
    f'{LINK_FILE} holds more than {MAX_LINK_BYTES:,} bytes '
    f'({MAX_LINK_BYTES >> 20} MiB), the most it may hold; no row is read',
  )


class _LinkProblems:
  """The problems parse_links finds: every one of the file as a whole, the
  first LISTED_LINK_PROBLEMS of each status for rows, and a count of the
  rows past them (their first and last line)."""

  def __init__(self):
    self._problems: list[LinkProblem] = []
    self._listed: dict[str, int] = {}
    self._unlisted: dict[str, list[int]] = {}  # status: [rows, first, last line]

  def __bool__(self) -> bool:
    return bool(self._problems)

  def append(self, problem: LinkProblem) -> None:
    self._problems.append(problem)

  def listed(self, status: str, line: int) -> bool:
    """Whether the problem row of ``status`` on ``line`` is listed (then
    append it); else it is counted."""
    if self._listed.get(status, 0) < LISTED_LINK_PROBLEMS:
      self._listed[status] = self._listed.get(status, 0) + 1
      return True
    unlisted = self._unlisted.setdefault(status, [0, line, line])
    unlisted[0] += 1
    unlisted[2] = line
    return False

  def rows(self) -> list[LinkProblem]:
    """The problems in file order, then one row per status counting those
    not listed."""
    return self._problems + [
      LinkProblem(
        '',
        '',
        status,
        f'lines {first} to {last}: {count:,} more {status} rows, not listed one '
        f'by one (the first {LISTED_LINK_PROBLEMS} are); none of them is used',
      )
      for status, (count, first, last) in self._unlisted.items()
    ]


def parse_links(
  data: bytes, pseudonyms: IdPseudonyms | None = None
) -> tuple[list[Link], list[LinkProblem]]:
  """Parses link.csv into usable links and problems.

  Tolerates a UTF-8 BOM, CRLF line endings, blank lines, quoted fields, extra
  columns and spaces around values. The first row with any content must be
  the header; columns are found by name. When a patient_id or original_id
  repeats, the first row (lowest line number) is used and each later one is a
  ``duplicate_link`` problem. Past LISTED_LINK_PROBLEMS rows of one status,
  one more row counts the rest (``lines 103 to 500001: 499,899 more ...``).
  More than MAX_LINK_BYTES is one ``malformed_link`` problem, and no row.

  Args:
    data: the raw bytes of link.csv (a reader needs no more than
      MAX_LINK_BYTES + 1 of them).
    pseudonyms: when active, every id in the links and problems (their
      details too) is its pseudonym; a Link keeps the patient_id as written
      in ``source_id`` and its split position.

  Returns:
    (links, problems), each in file order (the counts of rows not listed
    one by one last).
  """
  if len(data) > MAX_LINK_BYTES:
    return [], [oversized_links()]
  keyed = pseudonyms is not None and pseudonyms.active
  show_pid = pseudonyms.patient if keyed else str
  show_oid = pseudonyms.original if keyed else str

  def quoted(name: str, value: str) -> str:
    if not keyed:
      return f'{name} {value!r}'
    return (
      f'{name} {(show_pid if name == "patient_id" else show_oid)(value)!r} (pseudonym)'
    )

  text = data.decode('utf-8-sig', errors='replace')
  rows = csv.reader(io.StringIO(text, newline=''))
  links: list[Link] = []
  problems = _LinkProblems()
  columns: dict[str, int] | None = None
  first_pid_line: dict[str, int] = {}
  first_oid_line: dict[str, int] = {}
  try:
    for row in rows:
      line = rows.line_num
      fields = [field.strip() for field in row]
      if not any(fields):
        continue
      if columns is None:
        names = [field.lower() for field in fields]
        missing = [name for name in LINK_HEADER if name not in names]
        if missing:
          problems.append(
            LinkProblem(
              '',
              '',
              MALFORMED_LINK,
              f'line {line}: header '
              + (f'of {len(fields)} fields' if keyed else repr(','.join(fields)))
              + f' lacks {missing}; expected "{",".join(LINK_HEADER)}"; '
              'no row can be read',
            )
          )
          return links, problems.rows()
        columns = {name: names.index(name) for name in LINK_HEADER}
        continue
      pid_at, oid_at = columns['patient_id'], columns['original_id']
      if len(fields) <= max(pid_at, oid_at):
        if problems.listed(MALFORMED_LINK, line):
          problems.append(
            LinkProblem(
              show_pid(fields[0]) if fields else '',
              '',
              MALFORMED_LINK,
              f'line {line}: expected {max(pid_at, oid_at) + 1} fields, '
              f'got {len(fields)}',
            )
          )
        continue
      pid, oid = fields[pid_at], fields[oid_at]
      reasons = [
        f'{quoted(name, value)} {why}'
        for name, value in (('patient_id', pid), ('original_id', oid))
        if (why := id_problem(value))
      ]
      if reasons:
        if problems.listed(MALFORMED_LINK, line):
          problems.append(
            LinkProblem(
              show_pid(pid),
              show_oid(oid),
              MALFORMED_LINK,
              f'line {line}: ' + '; '.join(reasons),
            )
          )
        continue
      if pid in first_pid_line or oid in first_oid_line:
        if not problems.listed(DUPLICATE_LINK, line):
          continue
        earlier = (
          f'{quoted("patient_id", pid)} is already linked on line {first_pid_line[pid]}'
          if pid in first_pid_line
          else f'{quoted("original_id", oid)} is already linked on line '
          f'{first_oid_line[oid]}'
        )
        problems.append(
          LinkProblem(
            show_pid(pid),
            show_oid(oid),
            DUPLICATE_LINK,
            f'line {line}: {earlier}; this row is not used',
          )
        )
        continue
      first_pid_line[pid] = line
      first_oid_line[oid] = line
      if keyed:
        position = splits.patient_position(pid)
        links.append(Link(show_pid(pid), show_oid(oid), line, pid, position))
      else:
        links.append(Link(pid, oid, line))
  except csv.Error as e:
    problems.append(
      LinkProblem(
        '',
        '',
        MALFORMED_LINK,
        f'line {rows.line_num}: unreadable CSV ({e}); rows after it are not read',
      )
    )
  if columns is not None and not links and not problems:
    problems.append(
      LinkProblem('', '', MALFORMED_LINK, 'link.csv has a header and no rows')
    )
  if columns is None:
    problems.append(
      LinkProblem('', '', MALFORMED_LINK, 'link.csv has no header row and no links')
    )
  return links, problems.rows()


def classify_path(relative_path: str) -> DicomFile | ContourFile | StrayFile:
  """Classifies a file by its path relative to the data root.

  Args:
    relative_path: e.g. ``dicoms/SCD0000101/48.dcm``, always with ``/``.

  Returns:
    A DicomFile, a ContourFile, or a StrayFile saying why it has no place.
  """
  parts = relative_path.split('/')
  top = parts[0]
  owner = owner_of(relative_path)
  if top == DICOM_DIR:
    if len(parts) != 3:
      return StrayFile(owner, relative_path, f'not at {DICOM_PLACE}')
    match = _DICOM_NAME_RE.fullmatch(parts[2])
    if not match:
      return StrayFile(
        owner, relative_path, f'file name is not {DICOM_NAME} with n = 1, 2, 3 ...'
      )
    return DicomFile(owner, int(match.group(1)), relative_path)
  if top == CONTOUR_DIR:
    folders = {f'{kind}-contours': kind for kind in CONTOUR_KINDS}
    if len(parts) != 4 or parts[2] not in folders:
      return StrayFile(
        owner,
        relative_path,
        f'not at {CONTOUR_PLACE}',
      )
    match = _CONTOUR_NAME_RE.fullmatch(parts[3])
    if not match:
      return StrayFile(
        owner,
        relative_path,
        f'file name is not {CONTOUR_NAME}',
      )
    if match.group(2) != folders[parts[2]]:
      return StrayFile(
        owner,
        relative_path,
        f'a {match.group(2)}contour file in the {parts[2]} folder',
      )
    return ContourFile(owner, match.group(2), int(match.group(1)), relative_path)
  return StrayFile('', relative_path, 'outside dicoms/ and contourfiles/')


def is_layout_name(name: str) -> bool:
  """True for a name the layout itself gives (its folders, slice and contour
  file names): such a name carries no id."""
  return bool(
    name in (LINK_FILE, DICOM_DIR, CONTOUR_DIR)
    or name in {f'{kind}-contours' for kind in CONTOUR_KINDS}
    or _DICOM_NAME_RE.fullmatch(name)
    or _CONTOUR_NAME_RE.fullmatch(name)
  )


def owner_of(relative_path: str) -> str:
  """The patient or original id a path below dicoms/ or contourfiles/ is under."""
  parts = relative_path.split('/')
  return parts[1] if len(parts) > 2 else ''


def is_file_level(relative_path: str) -> bool:
  """True where the layout expects files, not folders (or deeper)."""
  parts = relative_path.split('/')
  return len(parts) >= (3 if parts[0] == DICOM_DIR else 4)


def contour_name(kind: str, slice_index: int) -> str:
  """The file name of the ``kind`` contour of slice ``slice_index``."""
  return f'IM-0001-{slice_index:04d}-{kind}contour-manual.txt'


# The decode stage's identity records (plain tuples: any coder carries them).
# slice:   (patient_id, original_id, slice_index, dicom_path, split, sop_uid,
#           pixel_hash or None)
# contour: (patient_id, original_id, slice_index, kind, path, content_hash)


def slice_identity(row: dict) -> tuple:
  """A written row's identity, for duplicate detection (transforms.duplicates)."""
  constant = 'constant_image' in row['qa_flags']  # see transforms.decode.quality
  return (
    row['patient_id'],
    row['original_id'],
    row['slice_index'],
    row['dicom_path'],
    row['split'],
    row['sop_instance_uid'],
    None if constant else row['pixel_xxh3'],
  )
