"""The decode stage: matched patients to Arrow tables of slice rows.

``DecodeSlices`` plans each Patient into SliceChunks (the pipeline's only
fan-out, so a Reshuffle follows), then ``DecodeSlicesFn`` turns each chunk
into one Arrow table, written later as one Parquet row group; a chunk whose
images hold more than ``--max-chunk-bytes`` becomes several. Files are read
and decoded a window at a time, so a worker's memory is bounded by that
budget whatever the input (see SliceDecoder). Unusable inputs
leave as error rows on the ERRORS output.

The work is elsewhere: ``SliceDecoder`` reads and decodes files (the native
reader in the worker, pydicom for the rest, in a child process by default),
``assemble.slice_row`` builds a row (masks, quality checks), and the DoFn
routes outcomes and counts them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
import xxhash
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from transforms import _bundles, _worker_progress, tuning
from transforms.contract import columns, layout, metrics, packing, schema, splits
from transforms.contract.layout import Patient
from transforms.contract.pseudonyms import IDENTITY, UID, Entry, Pseudonyms, Recent
from transforms.decode import _isolate, _native, assemble, fetch, quality
from transforms.decode.assemble import SliceResult, slice_row, unusable_slice
from transforms.decode.chunks import SliceChunk, SliceTask, bounds, plan_chunks
from transforms.decode.dicom import decode_dicom
from transforms.io import dicomweb, stores
from transforms.outcomes import Decoded, Failed, Outcome
from transforms.settings import DecodeSettings

_LOG = logging.getLogger(__name__)


class SliceDecoder:
  """Reads and decodes a chunk's files; one outcome per slice, in order.

  The bytes come from ``fetcher`` (transforms.decode.fetch: the tree, an
  object store or a PACS). The native reader takes what it can in this
  process (it cannot crash or hang, see transforms.decode._native); the rest
  goes to ``decode_fn`` (pydicom), in decoder children when
  ``settings.isolate`` (see transforms.decode._isolate), each under an
  address-space limit.

  Files are read a window at a time: a window closes when what it holds (the
  native reader's images, the bytes of files waiting for pydicom) reaches
  ``window_bytes``, so memory does not grow with the chunk.
  """

  def __init__(self, input_root: str, settings: DecodeSettings, decode_fn):
    self._limits = settings.limits
    self._window_bytes = max(1, settings.max_chunk_bytes // 4)
    self.fetcher = fetch.fetcher(input_root, settings, self._window_bytes)
    if settings.isolate:
      memory = _isolate.decoder_headroom(self._limits)
      self._fallback = _isolate.DecoderPool(
        [
          _isolate.IsolatedDecoder(
            input_root,
            decode_fn,
            settings.decode_timeout,
            memory,
            reread=self.fetcher.rereadable,
          )
          for _ in range(settings.decoders)
        ]
      )
    else:
      self._fallback = _isolate.InProcessDecoder(input_root, decode_fn)

  def _native(self, label: str, data: bytes) -> Decoded | None:
    try:
      return _native.decode(data, self._limits.max_pixels)
    except Exception:  # a bug in the fast path: let pydicom decide
      _LOG.exception('native reader failed on %s', label)
      return None

  def outcomes(
    self,
    paths: list[str],
    extras: list[dict[str, str]] | None = None,
    labels: list[str] | None = None,
    whole_series: bool = False,
  ) -> Iterator[tuple[Outcome, dict[str, bytes | Failed]]]:
    """(the outcome of each path, the bytes of its ``extras``: {name: path}
    of other files read with it, such as its contour files), in order, a
    window of files at a time. Where the fetcher reads ahead
    (``fetcher.ahead``), the reads are queued at once: call it for the next
    chunk before consuming this one's, and requests stay out while this one
    is finished. ``labels``: how log lines name the slices (default: their
    paths). ``whole_series``: the paths are a PACS series' instances,
    retrieved in one request."""
    extras = extras or [{}] * len(paths)
    items = [
      item
      for path, others in zip(paths, extras, strict=True)
      for item in ((path, True), *((p, False) for p in others.values()))
    ]
    reads = self.fetcher.reads(items, whole_series)
    return self._decoded(paths, extras, reads, labels or paths)

  def _decoded(self, paths, extras, reads, labels) -> Iterator:
    start = 0
    while start < len(paths):
      window: list[Outcome | None] = []
      besides: list[dict] = []
      for_pydicom, data_for_pydicom = [], []
      in_window = 0
      while start + len(window) < len(paths) and (
        not window or in_window < self._window_bytes
      ):
        k = start + len(window)
        data = next(reads)
        besides.append({name: next(reads) for name in extras[k]})
        in_window += sum(len(b) for b in besides[-1].values() if isinstance(b, bytes))
        if isinstance(data, Failed):
          window.append(data)
        elif (fast := self._native(labels[k], data)) is not None:
          window.append(fast)
          in_window += fast.image.nbytes
        else:
          window.append(None)
          for_pydicom.append(paths[k])
          data_for_pydicom.append(data)
          in_window += len(data)
      decoded = self._fallback.decode_all(for_pydicom, self._limits, data_for_pydicom)
      del data_for_pydicom  # the decoders hold what they still need
      for outcome, others in zip(window, besides, strict=True):
        yield (next(decoded) if outcome is None else outcome), others
      start += len(window)

  def close(self) -> None:
    self._fallback.close()
    self.fetcher.close()


class _Counters:
  """The decode stage's counters (see transforms.contract.metrics)."""

  def __init__(self):
    counter = lambda name: Metrics.counter(metrics.NAMESPACE, name)  # noqa: E731
    self.patients = counter(metrics.PATIENTS_DONE)
    self.slices = counter(metrics.SLICES_WRITTEN)
    self.bytes = counter(metrics.SLICE_BYTES_READ)
    self.masks = {kind: counter(name) for kind, name in metrics.MASKS_WRITTEN.items()}
    self.flags = {f: counter(metrics.qa_counter(f)) for f in quality.QA_FLAGS}
    self.split_patients = {
      s: counter(metrics.split_patients_counter(s)) for s in splits.SPLITS
    }
    self.split_slices = {
      s: counter(metrics.split_slices_counter(s)) for s in splits.SPLITS
    }
    self.fetches = {name: counter(name) for name in metrics.PACS_FETCHES}

  def chunk_done(self, chunk: SliceChunk, split: str, rows: int) -> None:
    done = int(chunk.is_last)
    self.patients.inc(done)
    self.split_patients[split].inc(done)
    self.slices.inc(rows)
    self.split_slices[split].inc(rows)

  def written(self, decoded: Decoded, result: SliceResult) -> None:
    self.bytes.inc(decoded.size)
    for kind, counter in self.masks.items():
      if result.row[f'{kind}_mask'] is not None:
        counter.inc()
    for flag in result.row['qa_flags']:
      self.flags[flag].inc()


@beam.typehints.with_input_types(SliceChunk)
@beam.typehints.with_output_types(pa.Table)
class DecodeSlicesFn(beam.DoFn):
  """SliceChunk -> one Arrow table of slice rows; unusable inputs as ERRORS."""

  ERRORS = 'errors'
  IDENTITIES = 'identities'
  ID_MAP = 'id_map'  # pseudonyms.Entry of the UIDs replaced

  def __init__(
    self,
    input_root: str,
    settings: DecodeSettings | None = None,
    decode_fn=decode_dicom,
  ):
    """Args:
    input_root: the data tree; task paths are relative to it.
    settings: see DecodeSettings (default: its defaults).
    decode_fn: decodes what the native reader declines; a module-level
      function (the decoder child imports it by name).
    """
    # Made here, on the launching machine, so every worker's copy shares it.
    self._run_id = uuid.uuid4().hex
    self._input_root = input_root
    self._settings = settings or DecodeSettings()
    self._decode_fn = decode_fn

  def setup(self):
    tuning.keep_freed_memory()
    stores.configure(self._settings.store)
    self._counters = _Counters()
    self._recent = Recent()
    self._progress = _worker_progress.progress(
      self._run_id, self._settings.progress_seconds, self._settings.progress_dir
    )
    self._decoder = SliceDecoder(self._input_root, self._settings, self._decode_fn)

  def teardown(self):
    self._decoder.close()

  def start_bundle(self):
    self._ahead = None  # (chunk, its outcomes) queued, not yet decoded

  def process(self, chunk: SliceChunk) -> Iterator:
    started = (chunk, self._start(chunk))
    if not self._decoder.fetcher.ahead:
      yield from self._finish(*started)
      return
    # On an object store or a PACS, one chunk ahead: this chunk's files are on their
    # way while the previous one is decoded and written, so the network is
    # never idle between chunks.
    ahead, self._ahead = self._ahead, started
    if ahead is not None:
      yield from self._finish(*ahead)

  def finish_bundle(self):
    self._progress.flush()
    if self._ahead is not None:
      ahead, self._ahead = self._ahead, None
      yield from _bundles.finished(self._finish(*ahead))
      self._progress.flush()

  def _start(self, chunk: SliceChunk):
    return self._decoder.outcomes(
      [task.dicom_source for task in chunk.slices],
      [task.contour_sources() for task in chunk.slices],
      [task.dicom_path for task in chunk.slices],
      whole_series=chunk.whole_series,
    )

  def _finish(self, chunk: SliceChunk, outcomes) -> Iterator:
    """Routes a chunk's outcomes: row groups to the main output, unusable
    inputs to ERRORS, replaced ids to ID_MAP, what duplicates compare to
    IDENTITIES."""
    split = chunk.split(self._settings.split_fractions)
    groups = _RowGroups(
      bounds(len(chunk.slices), self._settings.chunk_size)[1:-1],
      self._settings.max_chunk_bytes,
    )
    slices, contour_ids = [], []
    for k, (task, (outcome, contours)) in enumerate(
      zip(chunk.slices, outcomes, strict=True)
    ):
      yield from groups.cut_before(k)
      outcome, contours, entries = self._as_written(task, outcome, contours)
      for entry in entries:
        yield pvalue.TaggedOutput(self.ID_MAP, entry)
      if isinstance(outcome, Failed):
        yield pvalue.TaggedOutput(self.ERRORS, unusable_slice(chunk, task, outcome))
        continue
      result = slice_row(chunk, split, task, outcome, contours)
      for error in result.errors:
        yield pvalue.TaggedOutput(self.ERRORS, error)
      self._counters.written(outcome, result)
      slices.append(layout.slice_identity(result.row))
      contour_ids += [
        (chunk.patient_id, chunk.original_id, task.slice_index, kind, path, digest)
        for kind, path in task.contour_paths().items()
        if (digest := _content_digest(contours[kind])) is not None
      ]
      yield from groups.add(result.row)
    last_rows = groups.last()
    self._counters.chunk_done(chunk, split, groups.rows)
    for name, n in self._decoder.fetcher.counts().items():
      self._counters.fetches[name].inc(n)
    self._progress.add(patients=int(chunk.is_last), slices=len(chunk.slices))
    yield from _row_groups(last_rows)
    if slices or contour_ids:
      yield pvalue.TaggedOutput(self.IDENTITIES, (tuple(slices), tuple(contour_ids)))

  def _as_written(
    self, task: SliceTask, outcome: Outcome, contours: dict
  ) -> tuple[Outcome, dict, list[Entry]]:
    """A slice's outcome and contours as the dataset shows them (excluded
    under --exclude-burned-in, pseudonymised under a key), and the id-map
    rows, not sent lately, of what the pseudonyms replaced."""
    if self._settings.exclude_burned_in and isinstance(outcome, Decoded):
      outcome = _excluded(outcome)
    pseudonyms = self._settings.pseudonyms or IDENTITY
    if not pseudonyms.active:
      return outcome, contours, []
    stored = outcome
    outcome, contours = _shown(pseudonyms, task, outcome, contours)
    if not pseudonyms.mapped:
      return outcome, contours, []
    entries = pseudonyms.entries(task.dicom_source, task.dicom_path)
    if isinstance(stored, Decoded):
      entries += [
        Entry(UID, uid, outcome.meta[name])
        for name in columns.REPLACED_UIDS
        if (uid := stored.meta.get(name))
      ]
    return outcome, contours, list(self._recent.fresh(entries))


class _RowGroups:
  """A chunk's rows cut into row groups: at ``cuts`` (the slice indexes
  where a whole series' chunk_size groups begin) and wherever the images
  held reach ``max_bytes``. ``rows``: how many were cut so far."""

  def __init__(self, cuts: list[int], max_bytes: int):
    self._cuts = set(cuts)
    self._max_bytes = max_bytes
    self._held: list[dict] = []
    self._held_bytes = 0
    self.rows = 0

  def cut_before(self, k: int) -> Iterator[pa.Table]:
    """The rows held, as tables, if slice ``k`` begins a group."""
    if k in self._cuts:
      yield from _row_groups(self.last())

  def add(self, row: dict) -> Iterator[pa.Table]:
    self._held.append(row)
    self._held_bytes += row['image'].nbytes
    if self._held_bytes >= self._max_bytes:  # a row group of its own
      yield from _row_groups(self.last())

  def last(self) -> list[dict]:
    """The rows held (counted as cut), and none held any more."""
    rows, self._held, self._held_bytes = self._held, [], 0
    self.rows += len(rows)
    return rows


def _row_groups(rows: list[dict]) -> Iterator[pa.Table]:
  """The tables (each one Parquet row group) of a chunk's rows: its labeled
  slices apart from the others, so that a reader of the labeled slices skips
  the row groups of the others from their statistics, without reading one
  image of them (dataset.shuffled_rows)."""
  labeled, rest = [], []
  for row in rows:
    has_mask = row['i_mask'] is not None or row['o_mask'] is not None
    (labeled if has_mask else rest).append(row)
  for part in (labeled, rest):
    if part:
      yield assemble.slice_table(part)


def _shown(
  pseudonyms: Pseudonyms, task: SliceTask, outcome: Outcome, contours: dict
) -> tuple[Outcome, dict]:
  """A slice's outcome and contours as written under pseudonymisation: the
  UIDs of the column table replaced (columns.REPLACE_UID), and messages
  (an OSError's, a server's) naming a file where it was read, by its shown
  path."""
  if isinstance(outcome, Failed):
    message = pseudonyms.scrub(outcome.message, task.dicom_source, task.dicom_path)
    outcome = outcome._replace(message=message)
  else:
    meta = dict(outcome.meta)
    for name in columns.REPLACED_UIDS:
      meta[name] = pseudonyms.uid(meta.get(name))
    outcome = outcome._replace(meta=meta)
  sources, shown = task.contour_sources(), task.contour_paths()
  contours = {
    kind: Failed(data.stage, pseudonyms.scrub(data.message, sources[kind], shown[kind]))
    if isinstance(data, Failed)
    else data
    for kind, data in contours.items()
  }
  return outcome, contours


def _excluded(decoded: Decoded) -> Outcome:
  """Under --exclude-burned-in: Failed (stage excluded) for a slice whose
  pixels may show text, else the slice."""
  if decoded.burned_in is None:
    return decoded
  return Failed(
    schema.STAGE_EXCLUDED,
    f'not written (--exclude-burned-in): {decoded.burned_in}; the pixels may show text',
  )


def _content_digest(data) -> str | None:
  """A contour file's content hash, None if it could not be read."""
  return None if isinstance(data, Failed) else xxhash.xxh3_64_hexdigest(data)


@beam.typehints.with_input_types(Patient)
@beam.typehints.with_output_types(bytes)
class PlanChunksFn(beam.DoFn):
  """Patient -> SliceChunks (see chunks.plan_chunks), each packed
  (``packing``): the Reshuffle after it holds a chunk as one bytes value,
  not a record per slice; DecodeSlices unpacks it after the Reshuffle, in
  the decode stage."""

  def __init__(self, chunk_size: int, labeled_only: bool, whole_series: bool = False):
    self._chunk_size = chunk_size
    self._labeled_only = labeled_only
    self._whole_series = whole_series

  def process(self, patient: Patient) -> Iterator[bytes]:
    for chunk in plan_chunks(
      patient, self._chunk_size, self._labeled_only, self._whole_series
    ):
      yield packing.pack(chunk)


def _by_patient_id(patients: list[Patient]) -> list[Patient]:
  """Patients in the order of their ids as shown. The order slices are
  decoded and written in must not follow the ids as stored (the order of
  link.csv or of the folders): under pseudonymisation, whoever knows the
  cohort's MRNs could then map pseudonyms back by rank. A barrier costs
  nothing here: the join before it already waits for every patient."""
  return sorted(patients, key=lambda p: p.patient_id)


class DecodeSlices(beam.PTransform):
  """Patients -> SLICES (Arrow tables, one per chunk), ERRORS (error rows) and
  IDENTITIES (per chunk, what FindDuplicates compares)."""

  SLICES = 'slices'
  ERRORS = DecodeSlicesFn.ERRORS
  IDENTITIES = DecodeSlicesFn.IDENTITIES  # see transforms.duplicates
  ID_MAP = DecodeSlicesFn.ID_MAP

  def __init__(
    self, input_root: str, settings: DecodeSettings | None = None, **fn_args
  ):
    """Args:
    input_root: the data tree.
    settings: see DecodeSettings (default: its defaults).
    fn_args: passed on to DecodeSlicesFn (``decode_fn``).
    """
    super().__init__()
    self._input_root = input_root
    self._settings = settings or DecodeSettings()
    self._fn_args = fn_args

  def expand(self, patients):
    settings = self._settings
    return (
      patients
      | 'AllPatients' >> beam.combiners.ToList()
      | 'ByPatientId' >> beam.FlatMap(_by_patient_id).with_output_types(Patient)
      | 'PlanChunks'
      >> beam.ParDo(
        PlanChunksFn(
          settings.chunk_size,
          settings.labeled_only,
          settings.dicomweb is not None
          and settings.dicomweb.retrieve == dicomweb.SERIES,
        )
      )
      | 'FanOut' >> beam.Reshuffle()
      | 'Unpack' >> beam.Map(packing.unpack).with_output_types(SliceChunk)
      | 'DecodeSlices'
      >> beam.ParDo(
        DecodeSlicesFn(self._input_root, settings, **self._fn_args)
      ).with_outputs(self.ERRORS, self.IDENTITIES, self.ID_MAP, main=self.SLICES)
    )
