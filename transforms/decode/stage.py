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

import collections
import logging
import threading
import uuid
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
import xxhash
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from transforms import _bundles, _worker_progress, tuning
from transforms.contract import columns, layout, metrics, packing, schema, splits
from transforms.contract.errors import FileTooLargeError
from transforms.contract.layout import Patient
from transforms.contract.pseudonyms import IDENTITY, UID, Entry, Pseudonyms, Recent
from transforms.decode import _isolate, _native, assemble, quality, series
from transforms.decode.assemble import SliceResult, slice_row, unusable_slice
from transforms.decode.chunks import SliceChunk, SliceTask, bounds, plan_chunks
from transforms.decode.dicom import decode_dicom
from transforms.io import dicomweb, files, stores
from transforms.outcomes import Decoded, Failed, Outcome
from transforms.settings import DecodeSettings

_LOG = logging.getLogger(__name__)


class SliceDecoder:
  """Reads and decodes a chunk's files; one outcome per slice, in order.

  The native reader takes what it can in this process (it cannot crash or
  hang, see transforms.decode._native); the rest goes to ``decode_fn`` (pydicom), in
  decoder children when ``settings.isolate`` (see transforms.decode._isolate), each
  under an address-space limit.

  Files are read a window at a time: a window closes when what it holds (the
  native reader's images, the bytes of files waiting for pydicom) reaches
  ``window_bytes``, so memory does not grow with the chunk. On object stores
  the files (slices and their contour files, in the order they are used) are
  fetched ahead, ``settings.store.read_concurrency`` requests in flight
  (stores.Prefetcher), so the network's latency overlaps with decoding.
  From a PACS, a whole series is retrieved in one request
  (transforms.decode.series), its instances held until used within
  ``settings.max_chunk_bytes`` for all of the worker's series at once; an
  instance the series' answer does not bring is retrieved on its own.
  """

  def __init__(self, input_root: str, settings: DecodeSettings, decode_fn):
    self._root = input_root
    self._limits = settings.limits
    self._window_bytes = max(1, settings.max_chunk_bytes // 4)
    self._pacs = (
      None if settings.dicomweb is None else dicomweb.client(settings.dicomweb)
    )
    self._prefetcher = (
      None
      if stores.is_local(input_root) and self._pacs is None
      else stores.Prefetcher(settings.store.read_concurrency, self._window_bytes)
    )
    # The PACS requests in flight (series answers being read included).
    self._slots = threading.BoundedSemaphore(max(1, settings.store.read_concurrency))
    self._budget = series.Budget(settings.max_chunk_bytes)
    self._fetches: collections.Counter[str] = collections.Counter()
    self._fetches_lock = threading.Lock()
    self._stream_failures = 0
    if settings.isolate:
      memory = _isolate.decoder_headroom(self._limits)
      self._fallback = _isolate.DecoderPool(
        [
          _isolate.IsolatedDecoder(
            input_root,
            decode_fn,
            settings.decode_timeout,
            memory,
            reread=self._pacs is None,
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

  def _count(self, name: str) -> None:
    with self._fetches_lock:
      self._fetches[name] += 1

  def fetch_counts(self) -> dict[str, int]:
    """{counter name: count} of the PACS fetches since the last call (the
    caller's thread adds them to Beam's counters, which are per thread)."""
    with self._fetches_lock:
      counts, self._fetches = dict(self._fetches), collections.Counter()
    return counts

  def _read(
    self, item: tuple[str, bool], stream: series.SeriesStream | None = None
  ) -> bytes | Failed:
    """The bytes of (path, whether it is a slice), from the PACS for slices
    when there is one (from ``stream`` if it brings them), else from the
    tree."""
    path, is_slice = item
    if not (is_slice and self._pacs is not None):
      return files.read_or_fail(self._root, path, self._limits.max_file_bytes)
    if stream is not None:
      found = stream.take(_instance_uid(path))
      if isinstance(found, bytes):
        self._count(metrics.PACS_INSTANCES_STREAMED)
        return found
      if found is not None:  # FileTooLargeError
        return Failed(schema.STAGE_FETCH, str(found))
    self._count(metrics.PACS_INSTANCES_RETRIEVED)
    try:
      with self._slots:
        return self._pacs.retrieve(path, self._limits.max_file_bytes)
    except FileTooLargeError as e:
      return Failed(schema.STAGE_FETCH, str(e))
    except Exception as e:  # DicomWebError (with its status) or a bug
      return Failed(schema.STAGE_FETCH, f'cannot retrieve: {e}')

  def _stream(self, paths: list[str]) -> series.SeriesStream | None:
    """A stream of the series that holds every one of ``paths`` (instance
    paths of a PACS), or None if they are not of one series."""
    series_paths = {path.rpartition('/instances/')[0] for path in paths}
    if self._pacs is None or len(series_paths) != 1 or '' in series_paths:
      return None
    (series_path,) = series_paths
    pacs = self._pacs
    return series.SeriesStream(
      lambda: pacs.open_series(series_path),
      [_instance_uid(path) for path in paths],
      self._limits.max_file_bytes,
      self._budget,
      self._slots,
      self._stream_ended,
    )

  def _stream_ended(self, reason: str | None) -> None:
    if reason is None:
      return
    self._count(metrics.PACS_SERIES_INCOMPLETE)
    self._stream_failures += 1
    log = _LOG.warning if self._stream_failures == 1 else _LOG.debug
    log(
      'a WADO-RS series retrieve ended early (%s); what it did not bring is '
      'retrieved instance by instance',
      reason,
    )

  def _reads(
    self, items: list[tuple[str, bool]], stream: series.SeriesStream | None = None
  ) -> Iterator[bytes | Failed]:
    if self._prefetcher is None:
      return map(self._read, items)
    if stream is None:
      return self._prefetcher.fetch(items, self._read)
    return _closing(
      self._prefetcher.fetch(items, lambda item: self._read(item, stream)), stream
    )

  def outcomes(
    self,
    paths: list[str],
    extras: list[dict[str, str]] | None = None,
    labels: list[str] | None = None,
    whole_series: bool = False,
  ) -> Iterator[tuple[Outcome, dict[str, bytes | Failed]]]:
    """(the outcome of each path, the bytes of its ``extras``: {name: path}
    of other files read with it, such as its contour files), in order, a
    window of files at a time. On an object store or a PACS (the slices of
    ``settings.dicomweb``) the reads are queued at
    once (stores.Prefetcher): call it for the next chunk before consuming
    this one's, and requests stay out while this one is finished.
    ``labels``: how log lines name the slices (default: their paths).
    ``whole_series``: the paths are a PACS series' instances, retrieved in
    one request (see the class)."""
    extras = extras or [{}] * len(paths)
    reads = self._reads(
      [
        item
        for path, more in zip(paths, extras, strict=True)
        for item in ((path, True), *((p, False) for p in more.values()))
      ],
      self._stream(paths) if whole_series else None,
    )
    return self._decoded(paths, extras, reads, labels or paths)

  def _decoded(self, paths, extras, reads, labels) -> Iterator:
    start = 0
    while start < len(paths):
      window: list[Outcome | None] = []
      besides: list[dict] = []
      rest, data_of_rest = [], []
      held = 0
      while start + len(window) < len(paths) and (
        not window or held < self._window_bytes
      ):
        k = start + len(window)
        data = next(reads)
        besides.append({name: next(reads) for name in extras[k]})
        held += sum(len(b) for b in besides[-1].values() if isinstance(b, bytes))
        if isinstance(data, Failed):
          window.append(data)
        elif (fast := self._native(labels[k], data)) is not None:
          window.append(fast)
          held += fast.image.nbytes
        else:
          window.append(None)
          rest.append(paths[k])
          data_of_rest.append(data)
          held += len(data)
      decoded = self._fallback.decode_all(rest, self._limits, data_of_rest)
      del data_of_rest  # the decoders hold what they still need
      for outcome, more in zip(window, besides, strict=True):
        yield (next(decoded) if outcome is None else outcome), more
      start += len(window)

  def close(self) -> None:
    self._fallback.close()
    if self._prefetcher is not None:
      self._prefetcher.close()


def _instance_uid(path: str) -> str:
  """The SOP Instance UID that ends a WADO-RS instance path."""
  return path.rpartition('/instances/')[2]


def _closing(reads: Iterator, stream: series.SeriesStream) -> Iterator:
  """``reads``, then ``stream`` closed (also when abandoned part-way)."""
  try:
    yield from reads
  finally:
    stream.close()


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
    self._remote = (
      not stores.is_local(self._input_root) or self._settings.dicomweb is not None
    )

  def teardown(self):
    self._decoder.close()

  def start_bundle(self):
    self._ahead = None  # (chunk, its outcomes) queued, not yet decoded

  def process(self, chunk: SliceChunk) -> Iterator:
    started = (chunk, self._start(chunk))
    if not self._remote:
      yield from self._finish(*started)
      return
    # On an object store or a PACS, one chunk ahead: this chunk's files are on their
    # way while the previous one is decoded and written, so the network is
    # never idle between chunks.
    ahead, self._ahead = self._ahead, started
    if ahead is not None:
      yield from self._finish(*ahead)

  def _mapped(
    self, pseudonyms: Pseudonyms, task: SliceTask, stored: Outcome, shown: Outcome
  ):
    """The id-map rows, not sent lately, of a slice's PACS path and of the
    UIDs that ``shown`` (from :func:`_shown`) replaced in ``stored``."""
    found = pseudonyms.entries(task.dicom_source, task.dicom_path)
    if isinstance(stored, Decoded):
      found += [
        Entry(UID, uid, shown.meta[name])
        for name in columns.REPLACED_UIDS
        if (uid := stored.meta.get(name))
      ]
    for entry in self._recent.fresh(found):
      yield pvalue.TaggedOutput(self.ID_MAP, entry)

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
    split = chunk.split(self._settings.split_fractions)
    pseudonyms = self._settings.pseudonyms or IDENTITY
    rows, held, written = [], 0, 0
    slices, contour_ids = [], []
    # A whole series is written as row groups of up to chunk_size slices.
    cuts = set(bounds(len(chunk.slices), self._settings.chunk_size)[1:-1])
    for k, (task, (outcome, contours)) in enumerate(
      zip(chunk.slices, outcomes, strict=True)
    ):
      if k in cuts and rows:
        yield from _row_groups(rows)
        written += len(rows)
        rows, held = [], 0
      if self._settings.exclude_burned_in and isinstance(outcome, Decoded):
        outcome = _excluded(outcome)
      if pseudonyms.active:
        stored = outcome
        outcome, contours = _shown(pseudonyms, task, outcome, contours)
        if pseudonyms.mapped:
          yield from self._mapped(pseudonyms, task, stored, outcome)
      if isinstance(outcome, Failed):
        yield pvalue.TaggedOutput(self.ERRORS, unusable_slice(chunk, task, outcome))
        continue
      result = slice_row(chunk, split, task, outcome, contours)
      for error in result.errors:
        yield pvalue.TaggedOutput(self.ERRORS, error)
      self._counters.written(outcome, result)
      rows.append(result.row)
      slices.append(layout.slice_identity(result.row))
      contour_ids += [
        (chunk.patient_id, chunk.original_id, task.slice_index, kind, path, digest)
        for kind, path in task.contour_paths().items()
        if (digest := _content_digest(contours[kind])) is not None
      ]
      held += result.row['image'].nbytes
      if held >= self._settings.max_chunk_bytes:  # a row group of its own
        yield from _row_groups(rows)
        written += len(rows)
        rows, held = [], 0
    written += len(rows)
    self._counters.chunk_done(chunk, split, written)
    for name, n in self._decoder.fetch_counts().items():
      self._counters.fetches[name].inc(n)
    self._progress.add(patients=int(chunk.is_last), slices=len(chunk.slices))
    yield from _row_groups(rows)
    if slices or contour_ids:
      yield pvalue.TaggedOutput(self.IDENTITIES, (tuple(slices), tuple(contour_ids)))


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
