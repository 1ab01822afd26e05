"""The PACS side of reconciliation: link.csv's patients searched on a DICOMweb
server, as the same DicomFile records (in FileGroups) a tree's listing gives.

``SearchPacs`` takes the Links, spreads their patient ids over the workers
(a Reshuffle) and searches each with QIDO-RS (paged). ``choose_series``, a
pure function, turns one patient's instances into DicomFiles of one series:
slice n is the instance whose InstanceNumber is n, and its path is the
instance's WADO-RS path. Several series (after ``--series-filter``) give an
``ambiguous_series`` row and no slice; an instance without a usable
InstanceNumber, or sharing it with another, is an error row.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from transforms import _bundles
from transforms.contract import layout, metrics, schema
from transforms.contract.pseudonyms import IDENTITY, Pseudonyms
from transforms.io import dicomweb, stores
from transforms.io.dicomweb import DicomWebConfig, Instance, SeriesFilter
from transforms.sources.listing import ListTree, ReadLinks
from transforms.sources.source import PACS, Source

_LOG = logging.getLogger(__name__)


class Chosen(NamedTuple):
  """One patient's search, decided: its slices, and what is reported."""

  files: list[layout.DicomFile]
  reconciliation: list[tuple[str, str]]  # (status, detail)
  errors: list[tuple[str, str]]  # (path, message)


def _describe(series: str, instances: list[Instance], pseudonyms: Pseudonyms) -> str:
  """A series as reconciliation rows name it; under pseudonymisation its UID
  is the pseudonym and its description (free text) is left out."""
  first = instances[0]
  details = [
    f'SeriesNumber {first.series_number or "?"}',
    *([] if pseudonyms.active else [f'SeriesDescription {first.series_description!r}']),
    first.modality or 'no Modality',
    f'{len(instances)} instances',
  ]
  return f'{pseudonyms.uid(series)} ({", ".join(details)})'


def _filter_text(series_filter: SeriesFilter, pseudonyms: Pseudonyms) -> str:
  """--series-filter as rows quote it. Under pseudonymisation a UID is
  shown by its pseudonym and any other pattern is withheld: quoted next to
  the series' pseudonymised UIDs, the stored UID would link the two."""
  if not pseudonyms.active:
    return str(series_filter)
  pattern = series_filter.pattern
  if series_filter.keyword.endswith('UID') and not set(pattern) & set('*?['):
    return f'{series_filter.keyword}={pseudonyms.uid(pattern)}'
  return f'{series_filter.keyword}=<pattern of {len(pattern)} characters>'


def _slice_index(number: str) -> int | None:
  """InstanceNumber (an IS: optional sign and spaces) as a slice index."""
  try:
    value = int(number.strip())
  except ValueError:
    return None
  return value if value >= 0 else None


def _value(value: str, pseudonyms: Pseudonyms) -> str:
  """A header value a row quotes: under pseudonymisation only its length."""
  return f'of {len(value)} characters' if pseudonyms.active else repr(value)


def choose_series(
  patient_id: str,
  query: str,
  instances: Iterable[Instance],
  series_filter: SeriesFilter | None = None,
  pseudonyms: Pseudonyms = IDENTITY,
) -> Chosen:
  """The slices of ``patient_id`` from its instances on the server.

  Args:
    patient_id: as shown (its pseudonym, if so).
    query: the search, named in error rows about instances with bad UIDs.
    series_filter: keeps only the series it matches.
    pseudonyms: when active, paths and series are shown by their UIDs'
      pseudonyms; a DicomFile keeps its real path in ``source``.
  """
  errors: list[tuple[str, str]] = []
  by_series: dict[str, list[Instance]] = collections.defaultdict(list)
  show = pseudonyms.path
  for instance in instances:
    if (problem := instance.uid_problem(pseudonyms.active)) is not None:
      errors.append((query, problem))
    else:
      by_series[instance.series].append(instance)
  if not by_series:
    return Chosen([], [], errors)
  candidates = sorted(by_series)
  if series_filter is not None:
    candidates = [u for u in candidates if series_filter.matches(by_series[u][0])]
  described = '; '.join(
    _describe(u, by_series[u], pseudonyms) for u in sorted(by_series)
  )
  if not candidates:
    return Chosen(
      [],
      [
        (
          schema.MISSING_DICOMS,
          f'none of the {len(by_series)} series of PatientID {patient_id} on the '
          f'server matches --series-filter '
          f'{_filter_text(series_filter, pseudonyms)}: {described}',
        )
      ],
      errors,
    )
  if len(candidates) > 1:
    matching = (
      f' match --series-filter {_filter_text(series_filter, pseudonyms)}'
      if series_filter
      else ''
    )
    choices = '; '.join(_describe(u, by_series[u], pseudonyms) for u in candidates)
    return Chosen(
      [],
      [
        (
          schema.AMBIGUOUS_SERIES,
          f'{len(candidates)} series of PatientID {patient_id}{matching}: {choices}; '
          'choose one with --series-filter',
        )
      ],
      errors,
    )
  chosen = sorted(by_series[candidates[0]], key=lambda i: i.sop)
  numbered: dict[int, list[Instance]] = collections.defaultdict(list)
  for instance in chosen:
    index = _slice_index(instance.number)
    if index is None:
      why = (
        'has no InstanceNumber (0020,0013)'
        if not instance.number
        else f'has InstanceNumber {_value(instance.number, pseudonyms)}, '
        'not a number from 0 up'
      )
      errors.append(
        (show(instance.path), f'{why}: it cannot be matched to a contour file')
      )
    else:
      numbered[index].append(instance)
  files = []
  for index, holders in sorted(numbered.items()):
    if len(holders) == 1:
      path = holders[0].path
      source = path if pseudonyms.active else ''
      files.append(
        layout.DicomFile(patient_id, index, show(path), source, layout.INSTANCE_STAMP)
      )
      continue
    for instance in holders:
      errors.append(
        (
          show(instance.path),
          f'InstanceNumber {index} is held by {len(holders)} instances of series '
          f'{pseudonyms.uid(instance.series)}; none of them is used',
        )
      )
  return Chosen(files, [], errors)


# Searches in flight per worker (at most --read-concurrency): a search of a
# few hundred instances keeps the server busy for a fraction of a second.
_SEARCHES = 8


class _SearchFn(beam.DoFn):
  """One Link: its patient's DicomFiles; reports as tagged outputs.

  Up to _SEARCHES patients of a bundle are searched at once (threads), so a
  worker with many patients is not one search after another; each patient's
  outputs leave when its search is done, the last ones at the bundle's end.
  """

  def __init__(
    self,
    config: DicomWebConfig,
    series_filter: SeriesFilter | None,
    pseudonyms: Pseudonyms,
  ):
    self._config = config
    self._filter = series_filter
    self._pseudonyms = pseudonyms

  def setup(self):
    self._client = dicomweb.client(self._config)
    self._instances = Metrics.counter(metrics.NAMESPACE, metrics.PACS_INSTANCES_FOUND)
    self._searches = _bundles.Ahead(min(_SEARCHES, self._config.concurrency), 'search')

  def teardown(self):
    self._searches.close()

  def start_bundle(self):
    self._searches.drop()

  def process(self, link: layout.Link) -> Iterator:
    for done in self._searches.put(self._search, link):
      yield from self._done(done)

  def finish_bundle(self):
    for done in self._searches.rest():
      yield from _bundles.finished(self._done(done))

  def _done(self, done: tuple[layout.Link, int, Chosen]) -> Iterator:
    link, instance_count, chosen = done
    self._instances.inc(instance_count)  # here: Beam's metrics are per thread
    yield from self._outputs(link, chosen)

  def _search(self, link: layout.Link) -> tuple[layout.Link, int, Chosen]:
    pid = link.patient_id  # as shown; the search asks by the id as written
    query = f'instances?PatientID={pid}'
    try:
      instances = list(self._client.search(link.query_id))
    except dicomweb.IncompleteSearchError as e:  # nothing rather than a part
      why = self._pseudonyms.scrub(str(e), link.query_id, pid)
      _LOG.warning('search for PatientID %s is incomplete: %s', pid, why)
      return link, 0, Chosen([], [], [(query, f'incomplete search: {why}')])
    except (OSError, ValueError) as e:
      why = self._pseudonyms.scrub(str(e), link.query_id, pid)
      _LOG.warning('search for PatientID %s failed: %s', pid, why)
      return link, 0, Chosen([], [], [(query, f'cannot search: {why}')])
    chosen = choose_series(pid, query, instances, self._filter, self._pseudonyms)
    return link, len(instances), chosen

  @staticmethod
  def _outputs(link: layout.Link, chosen: Chosen) -> Iterator:
    pid = link.patient_id
    if chosen.files:
      yield layout.FileGroup.of(pid, chosen.files)
    for status, detail in chosen.reconciliation:
      yield pvalue.TaggedOutput(
        SearchPacs.RECONCILIATION,
        schema.reconciliation_row(pid, link.original_id, status, detail),
      )
    for path, message in chosen.errors:
      yield pvalue.TaggedOutput(
        SearchPacs.ERRORS, schema.error_row(pid, path, schema.STAGE_SEARCH, message)
      )
    if not chosen.files and (chosen.reconciliation or chosen.errors):
      yield pvalue.TaggedOutput(SearchPacs.REPORTED, pid)


class SearchPacs(beam.PTransform):
  """Links -> DICOMS (a layout.FileGroup of DicomFiles per patient, paths
  under the service root),
  RECONCILIATION and ERRORS rows, and REPORTED: the patient ids whose missing
  slices these rows already explain (see Reconcile)."""

  DICOMS = 'dicoms'
  RECONCILIATION = 'reconciliation'
  ERRORS = 'errors'
  REPORTED = 'reported'

  def __init__(
    self,
    config: DicomWebConfig,
    series_filter: SeriesFilter | None,
    pseudonyms: Pseudonyms = IDENTITY,
  ):
    """``pseudonyms``: the Links' ids already are; paths and series UIDs
    are shown by theirs."""
    super().__init__()
    self._config = config
    self._filter = series_filter
    self._pseudonyms = pseudonyms

  def expand(self, links):
    return (
      links
      | 'SpreadPatients' >> beam.Reshuffle()
      | 'Search'
      >> beam.ParDo(
        _SearchFn(self._config, self._filter, self._pseudonyms)
      ).with_outputs(self.RECONCILIATION, self.ERRORS, self.REPORTED, main=self.DICOMS)
    )


class PacsSource(Source):
  """link.csv and contourfiles/ of the tree at ``input_root``, and each
  linked patient's slices found on the DICOMweb server of ``pacs``, with the
  outputs of every Source."""

  wording = PACS

  def __init__(
    self,
    input_root: str,
    pacs: DicomWebConfig,
    series_filter: SeriesFilter | None = None,
    config: stores.StoreConfig | None = None,
    pseudonyms: Pseudonyms = IDENTITY,
  ):
    super().__init__()
    self._input_root = input_root
    self._pacs = pacs
    self._filter = series_filter
    self._config = config
    self._pseudonyms = pseudonyms

  def expand(self, pbegin):
    links = pbegin | 'ReadLinks' >> ReadLinks(
      self._input_root, self._config, self._pseudonyms
    )
    contours = pbegin | 'ListTree' >> ListTree(
      self._input_root, self._config, (layout.CONTOUR_DIR,), self._pseudonyms
    )
    searched = links[ReadLinks.LINKS] | 'SearchPacs' >> SearchPacs(
      self._pacs, self._filter, self._pseudonyms
    )
    return {
      self.LINKS: links[ReadLinks.LINKS],
      self.DICOMS: searched[SearchPacs.DICOMS],
      self.CONTOURS: contours[ListTree.CONTOURS],
      self.REPORTED: searched[SearchPacs.REPORTED],
      self.RECONCILIATION: (
        links[ReadLinks.RECONCILIATION],
        searched[SearchPacs.RECONCILIATION],
      )
      | 'SourceReconciliation' >> beam.Flatten(),
      self.ERRORS: (
        links[ReadLinks.ERRORS],
        contours[ListTree.ERRORS],
        searched[SearchPacs.ERRORS],
      )
      | 'SourceErrors' >> beam.Flatten(),
      self.ID_MAP: (links[ReadLinks.ID_MAP], contours[ListTree.ID_MAP])
      | 'SourceIdMap' >> beam.Flatten(),
    }
