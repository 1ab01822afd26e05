"""The read side of reconciliation: link.csv and the data tree, as records.

``ReadLinks`` reads link.csv, and ``ListTree`` lists every file under dicoms/
and contourfiles/, classifying each by the input layout. Only ids and paths
come out: Links, DicomFiles and ContourFiles (in FileGroups, a folder's files
in one element), plus reconciliation rows for unusable link rows and error
rows for unusable files.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from transforms import _bundles
from transforms.contract import layout, metrics, pseudonyms, schema
from transforms.contract.errors import FileTooLargeError, UnsafePathError
from transforms.contract.pseudonyms import IDENTITY, Entry, Pseudonyms
from transforms.io import files, local, stores
from transforms.outcomes import Failed

_LOG = logging.getLogger(__name__)


class _ParseLinksFn(beam.DoFn):
  """Reads link.csv; emits Links, and problems as tagged outputs."""

  def __init__(
    self, input_root: str, config: stores.StoreConfig, pseudonyms: Pseudonyms
  ):
    self._input_root = input_root
    self._config = config
    self._pseudonyms = pseudonyms

  def setup(self):
    stores.configure(self._config)

  def process(self, relative_path: str) -> Iterator:
    data = _read_links(self._input_root, relative_path)
    if isinstance(data, Failed):
      yield pvalue.TaggedOutput(
        ReadLinks.ERRORS,
        schema.error_row('', relative_path, schema.STAGE_LINKS, data.message),
      )
    else:
      yield from self._parsed(relative_path, data)

  def _parsed(self, relative_path: str, data: bytes | None) -> Iterator:
    if data is None:
      links, problems = [], [layout.oversized_links()]
    else:
      links, problems = layout.parse_links(data, self._pseudonyms)
    _LOG.info('%s: %d links, %d problem rows', relative_path, len(links), len(problems))
    yield from links
    if self._pseudonyms.mapped and data is not None:
      for entry in _link_entries(data, links, problems):
        yield pvalue.TaggedOutput(ID_MAP, entry)
    for problem in problems:
      yield pvalue.TaggedOutput(
        ReadLinks.RECONCILIATION,
        schema.reconciliation_row(
          problem.patient_id, problem.original_id, problem.status, problem.detail
        ),
      )


def _read_links(root: str, relative: str) -> bytes | Failed | None:
  """link.csv's bytes; None when it holds more than layout.MAX_LINK_BYTES
  (refused from its size, unread: one malformed_link row); Failed, worded
  as files.read_or_fail words it, when it cannot be read."""
  try:
    return files.read_input(root, relative, layout.MAX_LINK_BYTES)
  except FileTooLargeError:
    return None
  except (OSError, UnsafePathError) as e:
    return Failed(schema.STAGE_LINKS, f'cannot read: {e}')
  except Exception as e:  # e.g. a file system without its options here
    return Failed(schema.STAGE_LINKS, f'cannot read: {type(e).__name__}: {e}')


def _link_entries(
  data: bytes, links: list[layout.Link], problems: list[layout.LinkProblem]
) -> Iterator[Entry]:
  """The id-map rows of link.csv's pseudonymised links and problems: the
  same file parsed without pseudonyms gives the ids as written, row for row."""
  written = layout.parse_links(data)
  for raw, pseudonymised in zip(
    (*written[0], *written[1]), (*links, *problems), strict=True
  ):
    if raw.patient_id:
      yield Entry(pseudonyms.PATIENT_ID, raw.patient_id, pseudonymised.patient_id)
    if raw.original_id:
      yield Entry(pseudonyms.ORIGINAL_ID, raw.original_id, pseudonymised.original_id)


ID_MAP = 'id_map'  # the tag of id-map rows (pseudonyms.Entry)


class _FromTree(beam.PTransform):
  """A transform that reads from the input tree at ``input_root``; with
  active ``pseudonyms``, every id and path it emits is pseudonymised, and
  ID_MAP has the id-map rows of what it replaced."""

  ID_MAP = ID_MAP

  def __init__(
    self,
    input_root: str,
    config: stores.StoreConfig | None = None,
    pseudonyms: Pseudonyms = IDENTITY,
  ):
    super().__init__()
    self._input_root = input_root
    self._config = config or stores.StoreConfig()
    self._pseudonyms = pseudonyms


class ReadLinks(_FromTree):
  """link.csv as Links (LINKS), reconciliation rows and error rows."""

  LINKS = 'links'
  RECONCILIATION = 'reconciliation'
  ERRORS = 'errors'

  def expand(self, pbegin):
    return (
      pbegin
      | 'LinkFile' >> beam.Create([layout.LINK_FILE])
      | 'ParseLinks'
      >> beam.ParDo(
        _ParseLinksFn(self._input_root, self._config, self._pseudonyms)
      ).with_outputs(self.RECONCILIATION, self.ERRORS, self.ID_MAP, main=self.LINKS)
    )


# The most files one FileGroup carries: a folder of more comes in several.
_GROUP_FILES = 4096


class _Grouper:
  """Files of one kind, gathered into a FileGroup while they have the same
  owner (a listing gives a folder's files one after another)."""

  def __init__(self, tag: str):
    self._tag = tag
    self._owner = ''
    self._files: list = []

  def add(self, owner: str, file) -> Iterator[pvalue.TaggedOutput]:
    """Takes ``file``; yields the group it closes, if any."""
    if owner != self._owner or len(self._files) >= _GROUP_FILES:
      yield from self.close()
      self._owner = owner
    self._files.append(file)

  def close(self) -> Iterator[pvalue.TaggedOutput]:
    """Yields the open group, if it has files."""
    if self._files:
      yield pvalue.TaggedOutput(
        self._tag, layout.FileGroup.of(self._owner, self._files)
      )
      self._files = []


@beam.typehints.with_input_types(tuple[str, str | None, str])
class _ClassifyFn(beam.DoFn):
  """Sorts listed files into DICOM slices, contour files and stray files
  (pseudonymised, if so, with their id-map rows); slices and contour files
  leave in FileGroups, a folder's files together."""

  def __init__(self, input_root: str, pseudonyms: Pseudonyms):
    self._input_root = input_root
    self._pseudonyms = pseudonyms

  def setup(self):
    self._stray = Metrics.counter(metrics.NAMESPACE, metrics.STRAY_FILES)
    self._recent = pseudonyms.Recent()

  def start_bundle(self):
    self._dicoms = _Grouper(ListTree.DICOMS)
    self._contours = _Grouper(ListTree.CONTOURS)

  def finish_bundle(self):
    yield from _bundles.finished((*self._dicoms.close(), *self._contours.close()))

  def process(self, listed: tuple[str, str | None, str]) -> Iterator:
    path, problem, stamp = listed
    relative = files.relative_to(self._input_root, path)
    if problem == files.EMPTY_FOLDER and not layout.is_file_level(relative):
      file = None  # an empty patient folder is reported by the joins, if linked
    elif problem is not None:
      file = layout.StrayFile(layout.owner_of(relative), relative, problem)
    else:
      file = layout.classify_path(relative)
      if not isinstance(file, layout.StrayFile):
        file = file._replace(stamp=stamp)
    if file is None:
      return
    listed = file.path
    file = self._pseudonyms.listed(file)
    if self._pseudonyms.mapped:
      yield from self._entries(listed, file.path)
    if isinstance(file, layout.DicomFile):
      yield from self._dicoms.add(file.patient_id, file)
    elif isinstance(file, layout.ContourFile):
      yield from self._contours.add(file.original_id, file)
    else:
      self._stray.inc()
      yield pvalue.TaggedOutput(
        ListTree.ERRORS,
        schema.error_row(
          file.owner_id, file.path, schema.STAGE_LIST, f'not used: {file.reason}'
        ),
      )

  def _entries(self, relative: str, shown_path: str) -> Iterator:
    for entry in self._recent.fresh(self._pseudonyms.entries(relative, shown_path)):
      yield pvalue.TaggedOutput(ID_MAP, entry)


def _walk_tops(
  root: str, tops: tuple[str, ...]
) -> Iterator[tuple[str, str | None, str]]:
  """(path, problem, stamp) for each entry of the local tree's top folders."""
  for top in tops:
    folder = files.join_path(root, top)
    if os.path.isdir(folder):
      for path, problem in files.walk_local(folder):
        now = time.time_ns()
        yield path, problem, '' if problem else local.stamp(path, now)


class _ListFn(beam.DoFn):
  """Lists folders of an object store: ``level`` gives the files and
  sub-folders of a top folder, ``files`` everything under one patient's
  folder (paged by the store's client). Up to ``--read-concurrency``
  folders are listed at once (threads), so a worker given many patients is
  not one round trip after another; the bound holds for the whole process
  (_listing_slots), also when the runner runs the top folders' listing and
  the patient folders' at once. A folder that cannot be listed is one
  (path, reason) pair, classified as a stray like any unusable entry."""

  def __init__(self, config: stores.StoreConfig, top: bool):
    self._config = config
    self._top = top

  def setup(self):
    stores.configure(self._config)
    self._listings = _bundles.Ahead(self._config.read_concurrency, 'list')
    self._slots = _listing_slots(self._config.read_concurrency)

  def teardown(self):
    self._listings.close()

  def start_bundle(self):
    self._listings.drop()

  def process(self, folder: str) -> Iterator:
    for outputs in self._listings.put(self._list, folder):
      yield from outputs

  def finish_bundle(self):
    for outputs in self._listings.rest():
      yield from _bundles.finished(outputs)

  def _list(self, folder: str) -> list:
    """One folder's outputs: (path, None, stamp) for each file, TaggedOutput
    _FOLDERS for each sub-folder of a top folder; if the listing fails,
    (folder, reason, '')."""
    store = stores.store(folder)
    outputs: list = []
    try:
      with self._slots:
        listed, folders = store.stamped(folder, self._top)
      outputs += [
        (path, None, stamp)
        for path, stamp in listed
        if self._top or not path.endswith('/')  # a "folder" marker object
      ]
      outputs += [pvalue.TaggedOutput(_FOLDERS, path) for path in folders]
    except OSError as e:
      outputs.append((folder, f'cannot list folder: {e}', ''))
    return outputs


_FOLDERS = 'folders'  # patient folders found by the top-level listing

_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _listing_slots(concurrency: int) -> threading.BoundedSemaphore:
  """The process's listings in flight, at most ``concurrency``: one
  semaphore shared by every _ListFn of the process."""
  with _SLOTS_LOCK:
    slots = threading.BoundedSemaphore(max(1, concurrency))
    return _SLOTS.setdefault(concurrency, slots)


class ListTree(_FromTree):
  """Lists every file under dicoms/ and contourfiles/ and classifies it:
  DICOMS and CONTOURS are FileGroups (layout.DicomFile and
  layout.ContourFile), ERRORS rows for the files the layout has no place for.

  Local trees are walked with os.scandir, which also reports what a glob
  would silently skip (unreadable or symlinked folders, special files).
  Object stores are listed in parallel: one listing of each top folder finds
  the patient folders, a Reshuffle spreads them over the workers, and each
  is listed on its own (paged), so listing time shrinks as workers are added
  and no element holds the whole tree's paths.
  """

  DICOMS = 'dicoms'
  CONTOURS = 'contours'
  ERRORS = 'errors'

  def __init__(
    self,
    input_root: str,
    config: stores.StoreConfig | None = None,
    tops: tuple[str, ...] = (layout.DICOM_DIR, layout.CONTOUR_DIR),
    pseudonyms: Pseudonyms = IDENTITY,
  ):
    """``tops``: the folders listed (only contourfiles/ when the slices come
    from a PACS)."""
    super().__init__(input_root, config, pseudonyms)
    self._tops = tops

  def expand(self, pbegin):
    root = self._input_root
    if stores.is_local(root):
      listed = (
        pbegin
        | 'Root' >> beam.Create([root])
        | 'Walk' >> beam.FlatMap(_walk_tops, self._tops)
      )
    else:
      tops = (
        pbegin
        | 'Tops' >> beam.Create([files.join_path(root, top) for top in self._tops])
        | 'ListTops'
        >> beam.ParDo(_ListFn(self._config, top=True)).with_outputs(
          _FOLDERS, main='files'
        )
      )
      folders = (
        tops[_FOLDERS]
        | 'SpreadFolders' >> beam.Reshuffle()
        | 'ListFolders' >> beam.ParDo(_ListFn(self._config, top=False))
      )
      listed = (
        tops.files,
        folders,
      ) | 'AllListed' >> beam.Flatten()
    return listed | 'Classify' >> beam.ParDo(
      _ClassifyFn(root, self._pseudonyms)
    ).with_outputs(self.DICOMS, self.CONTOURS, self.ERRORS, self.ID_MAP)
