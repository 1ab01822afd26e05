"""Writing the dataset: slice shards, the reconciliation report, the errors table.

The slice shards go through a Beam file sink (``_ParquetSink``), which
writes temporary files and renames them when the write finalises, so a
retried bundle leaves no duplicate; the two reports, one file each, are
written by one stage (``_WriteReportsFn``).

Parquet options are set per leaf column (Beam's WriteToParquet takes one
codec for all, and list columns are named by their leaf, e.g.
``pixel_spacing.list.element``): ``image`` with ``--image-codec`` (zstd at
level 2 by default, which keeps the dataset no larger than the plain
script's zstd output; ``none`` writes and reads back faster at 1.75x the
size, see bench/codecs.py), the masks with zstd, every other column with
LZ4 (``SMALL_CODEC``).
Only string columns are dictionary-encoded, all but the image and mask bytes
carry min/max statistics (on those they cost time and help no reader),
and every page carries a CRC checksum that readers verify. Each file is
hashed as it is written; the run summary lists every file's size and digest
(``transforms.contract.digests``). Each Arrow table of unlabeled slices,
from one SliceChunk of one patient, is one row group; the labeled slices of
several chunks are gathered into row groups of their own (``_LABELED_ROWS``).
Local shards are written with O_DIRECT where the file system allows it
(transforms/direct.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import uuid

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam import pvalue
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from transforms import tuning
from transforms.contract import digests, filestats, metrics, schema
from transforms.io import direct, files, protocol, stores
from transforms.io.protocol import is_local
from transforms.settings import (
  DEFAULT_IMAGE_CODEC,
  DEFAULT_MAX_CHUNK_BYTES,
  parse_image_codec,
)

CODEC = 'zstd'  # the masks' codec, and the image's unless image_codec says
# Every other column: a few hundred bytes a slice, read in pages of a few
# hundred bytes, where zstd's cost per page (a decompression context each)
# made reading a labeled row group's 40 small columns cost as much as its
# images; LZ4 (LZ4_RAW) reads them in about half the time for a negligible
# size (BENCHMARKS.md, "Figures behind the code").
SMALL_CODEC = 'lz4'
_BINARY_COLUMNS = ('image', 'i_mask', 'o_mask')
_REPORT_BATCH = 4096  # report rows per write
_SIDECAR = '.digest.json'  # beside each temporary file: its size and digest
# After writing a table this large, Arrow's allocator (mimalloc) is asked to
# return what it freed: a page holds at least one value, so a table of 64 MiB
# images leaves pages of 64 MiB behind, which mimalloc would keep: a few
# times the table's size of RSS stayed (BENCHMARKS.md, "Figures behind the code").
# Smaller tables reuse it.
_RELEASE_AFTER = 32 * 1024 * 1024


# The most Arrow tables one slice shard takes; the next go to a new shard.
# A Parquet writer keeps every row group's metadata until the file is
# closed (tens of KB per row group here: 41 columns with statistics), so a
# worker writing one shard for the whole run grew with the tree
# (BENCHMARKS.md, "Figures behind the code"). At this bound a shard is 128 row
# groups, about 7,500 slices of 256 x 256.
_SHARD_TABLES = 128


# A chunk's labeled slices come as a table of their own (decode._row_groups),
# a handful of rows: one slice in 5 to 10 has a contour. Written as they come
# they would make row groups of a handful of rows, and a reader of the
# labeled slices would pay a row group's fixed cost (BENCHMARKS.md) per
# handful. They are gathered here, across chunks and patients, into row
# groups of up to _LABELED_ROWS rows, and never more images than
# --max-chunk-bytes (the bound of a row group, and of what a writer holds).
_LABELED_ROWS = 64


def _image_bytes(table: pa.Table) -> int:
  """The bytes of a slice table's images (as decode counts them)."""
  return pc.sum(pc.binary_length(table['image'])).as_py() or 0


def _all_labeled(table: pa.Table) -> bool:
  """True for a slice table in which every row has a mask."""
  if 'i_mask' not in table.column_names or not table.num_rows:
    return False
  return pc.all(schema.has_mask(table)).as_py()


def _open_local_shard(path: str) -> direct.DirectFile:
  """A new local shard, written around the page cache (O_DIRECT) by a thread.

  The kernel no longer copies every shard byte into newly allocated
  page-cache pages, for about a quarter less CPU
  (BENCHMARKS.md, "Figures behind the code").
  """
  return direct.DirectFile(path, direct=tuning.enabled('direct'))


def leaf_paths(arrow_schema: pa.Schema) -> dict[str, list[str]]:
  """{column: its Parquet leaf paths}: ``pixel_spacing`` is stored as
  ``pixel_spacing.list.element``, and Parquet's per-column options name
  leaves (a top-level name of a list column silently matches nothing)."""
  buffer = pa.BufferOutputStream()
  pq.write_table(arrow_schema.empty_table(), buffer)
  parquet_schema = pq.read_metadata(buffer.getvalue()).schema
  leaves: dict[str, list[str]] = {name: [] for name in arrow_schema.names}
  for i in range(len(parquet_schema)):
    path = parquet_schema.column(i).path
    leaves[path.split('.', 1)[0]].append(path)
  return leaves


def writer_options(arrow_schema: pa.Schema, image_codec: str | None = None) -> dict:
  """ParquetWriter options, per leaf: ``image`` in ``image_codec``
  ('codec[:level]', default ``CODEC``), the masks in ``CODEC``, every other
  column in ``SMALL_CODEC``; dictionaries for strings; statistics
  for all but the image and mask bytes; a CRC checksum on every page."""
  leaves = leaf_paths(arrow_schema)
  codec, level = parse_image_codec(image_codec) if image_codec else (CODEC, None)
  compression, levels = {}, {}
  dictionary, statistics = [], []
  for f in arrow_schema:
    nested = pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
    value = f.type.value_type if nested else f.type
    for path in leaves[f.name]:
      if f.name == 'image':
        compression[path] = codec
      else:
        compression[path] = CODEC if f.name in _BINARY_COLUMNS else SMALL_CODEC
      if f.name == 'image' and level is not None:
        levels[path] = level
      if pa.types.is_string(value):
        dictionary.append(path)
      if f.name not in _BINARY_COLUMNS:
        statistics.append(path)
  return {
    'compression': compression,
    'compression_level': levels or None,
    'use_dictionary': dictionary,
    'write_statistics': statistics,
    'write_page_checksum': True,
  }


class _Hashed(protocol.AppendOnlyFile):
  """A binary file that hashes what is written through it (digests)."""

  def __init__(self, handle):
    self._handle = handle
    self._hash = digests.hasher()

  def flush(self) -> None:
    self._handle.flush()

  def write(self, data) -> int:
    self._hash.update(data)
    n = self._handle.write(data)
    self.size += len(memoryview(data).cast('B'))
    return n

  def close(self) -> None:
    self.closed = True

  def hexdigest(self) -> str:
    return self._hash.hexdigest()


class _Background:
  """A ParquetWriter whose tables are encoded, compressed and written by a
  thread of their own while the caller decodes the next ones (Arrow releases
  the GIL there), at most one table waiting. A failure there ends the thread
  and is raised by the caller's next write_table or close."""

  def __init__(self, writer: pq.ParquetWriter):
    self._writer = writer
    self._tables: queue.Queue = queue.Queue(maxsize=1)
    self._failure: BaseException | None = None
    self._thread = threading.Thread(
      target=self._run, name='parquet-writer', daemon=True
    )
    self._thread.start()

  def _run(self) -> None:
    while (table := self._tables.get()) is not None:
      try:
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        if table.nbytes >= _RELEASE_AFTER:
          pa.default_memory_pool().release_unused()
      except BaseException as e:  # raised in the caller's thread
        self._failure = e
        return
      del table

  def _put(self, item: pa.Table | None) -> None:
    while True:
      if self._failure is not None:
        raise self._failure
      try:
        self._tables.put(item, timeout=0.2)
        return
      except queue.Full:  # the thread is busy (or has just failed)
        continue

  def write_table(self, table: pa.Table) -> None:
    """Queues ``table`` as one row group."""
    self._put(table)

  def close(self) -> None:
    self._put(None)
    self._thread.join()
    if self._failure is not None:
      raise self._failure
    self._writer.close()

  @property
  def footer(self) -> pq.FileMetaData:
    """The written file's footer (after close)."""
    return self._writer.writer.metadata


class _ParquetSink(filebasedsink.FileBasedSink):
  """Writes Arrow tables (or row dicts, in batches) to Parquet with
  per-leaf options (``writer_options``) and records each file's size and
  digest: a sidecar per temporary file, then, when the write finalises, one
  ``_MANIFEST.json`` beside the table's files, keyed by final name. Locally
  the files are renamed to their final names; on an object store they stay
  where they were written and the manifest names each one's object
  (``digests.SOURCE``)."""

  def __init__(
    self,
    file_path_prefix: str,
    arrow_schema: pa.Schema,
    image_codec: str | None = None,
    num_shards: int = 0,
    config: stores.StoreConfig | None = None,
    max_group_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    max_tables: int | None = None,
  ):
    """``max_tables``: the most records (Arrow tables or report rows) a
    file takes before the next go to a new one (None: no bound)."""
    super().__init__(
      file_path_prefix,
      coder=None,
      file_name_suffix='.parquet',
      num_shards=num_shards,
      mime_type='application/x-parquet',
      compression_type=CompressionTypes.UNCOMPRESSED,
      max_records_per_shard=max_tables,
    )
    self._schema = arrow_schema
    self._image_codec = image_codec
    self._config = config or stores.StoreConfig()
    self._max_group_bytes = max_group_bytes

  def _remote(self) -> bool:
    """Whether the output is on an object store: then files are written
    through ``stores`` (multipart uploads as they are written, one client
    per worker) and never through Beam's S3/GCS file systems, which build a
    client per call."""
    if is_local(self.file_path_prefix.get()):
      return False
    stores.configure(self._config)
    return True

  def initialize_write(self):
    if not self._remote():
      return super().initialize_write()
    return self._create_temp_dir(self.file_path_prefix.get())  # no folders

  def pre_finalize(self, init_result, writer_results):
    # Beam deletes earlier files matching the final names; on an object store
    # that is a listing per table, and the run's staging folder is new.
    if not self._remote():
      return super().pre_finalize(init_result, writer_results)
    return None

  def open(self, temp_path):
    with _naming(temp_path):
      return self._open(temp_path)

  def _open(self, temp_path):
    if is_local(temp_path):
      handle = _open_local_shard(temp_path)
    elif self._remote():
      handle = stores.store(temp_path).create(temp_path)
    else:
      handle = super().open(temp_path)
    hashed = _Hashed(handle)
    writer = _Background(
      pq.ParquetWriter(
        hashed, self._schema, **writer_options(self._schema, self._image_codec)
      )
    )
    return handle, hashed, writer, temp_path, [], []

  def write_record(self, file_handle, record):
    _, _, writer, path, rows, labeled = file_handle
    with _naming(path):
      if isinstance(record, pa.Table) and _all_labeled(record):
        self._gather(writer, labeled, record)
        return
      if isinstance(record, pa.Table):
        writer.write_table(record)
        return
      rows.append(record)
      if len(rows) >= _REPORT_BATCH:
        self._flush_rows(writer, rows)

  def _gather(
    self, writer: _Background, labeled: list[pa.Table], table: pa.Table
  ) -> None:
    """Adds a table of labeled slices to those held, writing them as one row
    group when they reach _LABELED_ROWS rows or the image budget."""
    images = lambda tables: sum(_image_bytes(t) for t in tables)  # noqa: E731
    if labeled and images(labeled) + images([table]) > self._max_group_bytes:
      writer.write_table(pa.concat_tables(labeled))
      labeled.clear()
    labeled.append(table)
    rows = sum(t.num_rows for t in labeled)
    if rows >= _LABELED_ROWS or images(labeled) >= self._max_group_bytes:
      writer.write_table(pa.concat_tables(labeled))
      labeled.clear()

  def _flush_rows(self, writer: _Background, rows: list) -> None:
    writer.write_table(pa.Table.from_pylist(rows, schema=self._schema))
    rows.clear()

  def close(self, file_handle):
    handle, hashed, writer, path, rows, labeled = file_handle
    with _naming(path):
      if labeled:
        writer.write_table(pa.concat_tables(labeled))
      if rows:
        self._flush_rows(writer, rows)
      writer.close()
      super().close(handle)
      stats = filestats.of_footer(writer.footer)
      stores.write_bytes(
        path + _SIDECAR,
        json.dumps(digests.entry(hashed.size, hashed.hexdigest(), stats)).encode(),
      )

  def finalize_windowed_write(self, init_result, writer_results, pre_finalize, w=None):
    results = sorted(writer_results)
    finals = [self._get_final_name(k, len(results), w) for k in range(len(results))]
    manifest = {
      final.rsplit('/', 1)[-1]: json.loads(stores.read_bytes(temp + _SIDECAR))
      for temp, final in zip(results, finals, strict=True)
    }
    # Beam deletes its temporary folder afterwards, but not on every object
    # store: the sidecars go now, so none can be published.
    sidecars = [temp + _SIDECAR for temp in results]
    stores.store(sidecars[0] if sidecars else '.').delete(sidecars)
    if self._remote():
      # No rename on an object store: the temporary objects stay where they
      # are, and the launcher copies each once, straight into OUT/ when the
      # run publishes (beam_pipeline.launch.publish).
      for temp, final in zip(results, finals, strict=True):
        manifest[final.rsplit('/', 1)[-1]][digests.SOURCE] = temp
      yield from finals
    else:
      yield from super().finalize_windowed_write(
        init_result, writer_results, pre_finalize, w
      )
    folder = self.file_path_prefix.get().rsplit('/', 1)[0]
    stores.write_bytes(
      f'{folder}/{digests.MANIFEST_FILE}', json.dumps(manifest, indent=1).encode()
    )


@contextlib.contextmanager
def _naming(path: str):
  """Re-raises an OSError that names no file (a full disk, a file size limit)
  with ``path``, so the one-line failure says where it happened."""
  try:
    yield
  except OSError as e:
    if e.filename is not None:
      raise
    raise OSError(e.errno, e.strerror or str(e), path) from e


def _prefix(output_root: str, folder: str) -> str:
  return files.join_path(output_root, f'{folder}/part')


REPORT_FILE = 'part-00000-of-00001.parquet'  # each report's one file


class _WriteReportsFn(beam.DoFn):
  """Writes each report (its rows grouped under its key, with one None as a
  marker so an empty report is written too) to its one Parquet file in the
  staging folder, counting its rows by one field, and the folder's manifest
  beside it. Both reports take one stage, not a Beam file sink each: on a
  small tree the sinks' 14 bundles and 22 transforms cost about 0.2 s of a
  2.5 s run (BENCHMARKS.md). A retried bundle writes the same file again;
  locally it goes to a temporary name first, so no half file is left under
  the final one."""

  def __init__(self, output_root: str, reports: dict, config: stores.StoreConfig):
    """``reports``: {key: (folder, schema, field counted, {value: counter name})}."""
    self._root = output_root
    self._reports = reports
    self._config = config

  def setup(self):
    stores.configure(self._config)
    count = lambda name: Metrics.counter(metrics.NAMESPACE, name)  # noqa: E731
    self._counters = {
      key: {value: count(name) for value, name in names.items()}
      for key, (_, _, _, names) in self._reports.items()
    }

  def process(self, grouped):
    key, rows = grouped
    folder, arrow_schema, field, _ = self._reports[key]
    path = stores.join(self._root, folder, REPORT_FILE)
    counters = self._counters[key]
    with _naming(path):
      temp = f'{path}.{uuid.uuid4().hex}.tmp' if is_local(path) else path
      handle = stores.store(temp).create(temp)
      hashed = _Hashed(handle)
      writer = pq.ParquetWriter(hashed, arrow_schema, **writer_options(arrow_schema))
      batch: list[dict] = []
      for row in sorted((row for row in rows if row is not None), key=_row_order):
        counters[row[field]].inc()
        batch.append(row)
        if len(batch) >= _REPORT_BATCH:
          writer.write_table(pa.Table.from_pylist(batch, schema=arrow_schema))
          batch.clear()
      if batch:
        writer.write_table(pa.Table.from_pylist(batch, schema=arrow_schema))
      writer.close()
      handle.close()
      if temp != path:
        os.replace(temp, path)
      stats = filestats.of_footer(writer.writer.metadata)
      manifest = {REPORT_FILE: digests.entry(hashed.size, hashed.hexdigest(), stats)}
      stores.write_bytes(
        stores.join(self._root, folder, digests.MANIFEST_FILE),
        json.dumps(manifest, indent=1).encode(),
      )
    yield pvalue.TaggedOutput(key, path)


def _row_order(row: dict) -> tuple:
  """A report's rows in the order of their values as shown (patient id
  first), never in the order they came in, which follows the ids as stored
  (under pseudonymisation it would map pseudonyms back by rank)."""
  return tuple('' if value is None else str(value) for value in row.values())


class WriteDataset(beam.PTransform):
  """Writes ``{SLICES: Arrow tables, RECONCILIATION: rows, ERRORS: rows}``.

  Slices go to ``OUT/slices/part-SSSSS-of-NNNNN.parquet``, one row group per
  Arrow table of unlabeled slices (from one SliceChunk), labeled slices
  gathered into row groups of their own, at most _SHARD_TABLES tables a
  shard; the two reports to one file each, counted by status and by stage.
  Returns the written file names under the same keys.
  """

  SLICES = 'slices'
  RECONCILIATION = 'reconciliation'
  ERRORS = 'errors'

  # key -> (folder, schema, field counted, its values, counter name of a value)
  _REPORTS = {
    RECONCILIATION: (
      schema.RECONCILIATION_DIR,
      schema.RECONCILIATION_SCHEMA,
      'status',
      schema.STATUSES,
      metrics.reconciliation_counter,
    ),
    ERRORS: (
      schema.ERRORS_DIR,
      schema.ERROR_SCHEMA,
      'stage',
      schema.STAGES,
      metrics.error_counter,
    ),
  }

  def __init__(
    self,
    output_root: str,
    image_codec: str = DEFAULT_IMAGE_CODEC,
    config: stores.StoreConfig | None = None,
    max_group_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
  ):
    """``max_group_bytes``: the most image bytes of a row group of labeled
    slices gathered from several tables (--max-chunk-bytes)."""
    super().__init__()
    self._output_root = output_root
    self._image_codec = image_codec
    self._config = config
    self._max_group_bytes = max_group_bytes

  def expand(self, outputs):
    root = self._output_root
    written = {
      self.SLICES: outputs[self.SLICES]
      | 'WriteSlices'
      >> beam.io.Write(
        _ParquetSink(
          _prefix(root, schema.SLICES_DIR),
          schema.SLICE_SCHEMA,
          self._image_codec,
          config=self._config,
          max_group_bytes=self._max_group_bytes,
          max_tables=_SHARD_TABLES,
        )
      )
    }
    reports = {
      key: (folder, arrow_schema, field, {value: counter(value) for value in values})
      for key, (folder, arrow_schema, field, values, counter) in self._REPORTS.items()
    }
    markers = outputs[self.SLICES].pipeline | 'Reports' >> beam.Create(
      [(key, None) for key in reports], reshuffle=False
    )
    tagged = [
      outputs[key]
      | f'Tag{key.capitalize()}'
      >> beam.Map(lambda row, key=key: (key, row)).with_output_types(tuple[str, dict])
      for key in reports
    ]
    report_files = (
      (markers, *tagged)
      | 'AllReports' >> beam.Flatten()
      | 'ByReport' >> beam.GroupByKey()
      | 'WriteReports'
      >> beam.ParDo(_WriteReportsFn(root, reports, self._config)).with_outputs(*reports)
    )
    written.update({key: report_files[key] for key in reports})
    return written
