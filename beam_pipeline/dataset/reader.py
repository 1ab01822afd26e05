"""Reading the pipeline's output back: pure pyarrow and numpy, no Beam.

ds = open_dataset('output')
for row in ds.to_table(filter=pc.field('patient_id') == 'SCD0000101').to_pylist():
    image = image_of(row)                  # (rows, columns) numpy array
    inner = mask_of(row, 'i')              # bool array, or None

Every reader takes a ``version`` (default: the latest; ``cardiac-mri
history`` lists them) and first checks that version against its run record
(``versions``): no committed version, a missing, extra or resized file, or an
altered record raise ``DatasetError``. The training readers
(``shuffled_rows``, ``iter_batches``) also hash each shard the first time a
process opens it, and every page's checksum is verified as it is read.
"""

from __future__ import annotations

import bisect
import os
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from beam_pipeline.dataset import labels, prepare, versions
from beam_pipeline.dataset.versions import DatasetError
from transforms.contract import digests, schema, splits


def _folder(output: str, name: str) -> str:
  """``output/name``, which must exist.

  Raises:
    FileNotFoundError: ``output`` is not a pipeline output.
  """
  folder = os.path.join(output, name)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'{folder} not found: is {output} a pipeline output?')
  return folder


def read_summary(output: str, version: int | None = None) -> dict:
  """The run record of a version (default: the latest), checked against its
  own digest: counters, options, input, run id and every file with its size
  and digest (see ``versions``).

  Raises:
    DatasetError: no version was committed, no such version, or its record
      was altered or written by another schema version.
  """
  return versions.record(output, version)


def file_problems(output: str, summary: dict, full: bool) -> list[str]:
  """What differs between the files on disk and the summary's record: missing,
  extra and resized files, and with ``full`` changed content (each file is
  read and hashed). Empty when the dataset is as written."""
  recorded = summary[digests.FILES]
  present = versions.version_files(output, summary)
  problems = [
    f'{name} is not in the version its run committed'
    for name in sorted(set(recorded) - present)
  ]
  problems += [
    f"{name} is not one of the run's files" for name in sorted(present - set(recorded))
  ]
  for name in sorted(present & set(recorded)):
    path = os.path.join(output, name)
    try:
      size = os.path.getsize(path)
    except FileNotFoundError:
      problems.append(f'{name} is missing')
      continue
    expected = recorded[name]
    if size != expected['bytes']:
      problems.append(f'{name} holds {size} bytes, the run wrote {expected["bytes"]}')
    elif full and _digest(path) != expected[digests.ALGORITHM]:
      problems.append(f'{name} was altered: its content does not match its digest')
  return problems


def _digest(path: str) -> str:
  with open(path, 'rb') as f:
    return digests.of_stream(f)[1]


def check(output: str, full: bool = False, version: int | None = None) -> dict:
  """Checks a version of ``output`` (default: the latest) against its run
  record and returns the record.

  Args:
    full: also hash every file (reads the whole dataset); otherwise only the
      set of files and their sizes are compared.
    version: the dataset version (``cardiac-mri history`` lists them).

  Raises:
    FileNotFoundError: ``output`` is not a pipeline output.
    DatasetError: see :func:`read_summary` and :func:`file_problems`.
  """
  _folder(output, schema.SLICES_DIR)
  summary = read_summary(output, version)
  problems = file_problems(output, summary, full)
  if problems:
    unlisted = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
    raise DatasetError(
      f'version {summary[versions.VERSION]} of {output} is not the dataset its '
      f'run wrote: {problems[0]}{unlisted}; python -m beam_pipeline.tools.verify '
      f'{output} lists every problem'
    )
  return summary


# Shards whose digest this process has checked: {(path, size, mtime): True}.
_VERIFIED: dict[tuple[str, int, int], bool] = {}


def _open_shard(
  path: str, summary: dict, metadata: pq.FileMetaData | None = None
) -> pq.ParquetFile:
  """A slice shard, hashed against the summary the first time this process
  opens it, read with page checksums verified. ``metadata``: its footer, if
  already read (parsing a footer of hundreds of row groups costs more than
  reading one of them)."""
  stat = os.stat(path)
  key = (path, stat.st_size, stat.st_mtime_ns)
  if key not in _VERIFIED:
    name = f'{schema.SLICES_DIR}/{os.path.basename(path)}'
    if _digest(path) != summary[digests.FILES][name][digests.ALGORITHM]:
      raise DatasetError(f'{path} was altered: its content does not match its digest')
    _VERIFIED[key] = True
  return pq.ParquetFile(path, metadata=metadata, page_checksum_verification=True)


def _parquet_format() -> pads.ParquetFileFormat:
  return pads.ParquetFileFormat(
    default_fragment_scan_options=pads.ParquetFragmentScanOptions(
      page_checksum_verification=True
    )
  )


def open_dataset(output: str, version: int | None = None) -> pads.Dataset:
  """The slices of a version of a pipeline output (default: the latest), as
  a pyarrow Dataset.

  The files are checked against the run record (set and sizes;
  ``check(output, full=True)`` hashes them too) and every page's checksum is
  verified as it is read.

  Raises:
    FileNotFoundError: ``output`` holds no slices folder.
    DatasetError: a file is missing, extra or resized, or the summary is.
  """
  return _dataset(output, check(output, version=version))


def _read_report(
  output: str, name: str, arrow_schema: pa.Schema, version: int | None
) -> pa.Table:
  summary = check(output, version=version)
  files = sorted(n for n in summary[digests.FILES] if n.startswith(name + '/'))
  if not files:
    return arrow_schema.empty_table()
  tables = []
  for n in files:
    path = os.path.join(output, n)
    if _digest(path) != summary[digests.FILES][n][digests.ALGORITHM]:
      raise DatasetError(f'{path} was altered: its content does not match its digest')
    tables.append(
      pq.read_table(path, schema=arrow_schema, page_checksum_verification=True)
    )
  return pa.concat_tables(tables)


def read_reconciliation(output: str, version: int | None = None) -> pa.Table:
  """The reconciliation report (patient_id, original_id, status, detail) of
  a version (default: the latest).

  Raises:
    DatasetError: the dataset is not as its run wrote it (see :func:`check`).
  """
  return _read_report(
    output, schema.RECONCILIATION_DIR, schema.RECONCILIATION_SCHEMA, version
  )


def read_errors(output: str, version: int | None = None) -> pa.Table:
  """The dead-letter table (patient_id, path, stage, error) of a version
  (default: the latest).

  Raises:
    DatasetError: the dataset is not as its run wrote it (see :func:`check`).
  """
  return _read_report(output, schema.ERRORS_DIR, schema.ERROR_SCHEMA, version)


# Columns needed to decode image and masks, whatever the caller projects.
_SHAPE_COLUMNS = ('rows', 'columns', 'samples_per_pixel', 'pixel_dtype')


def _image_type(
  rows: int, columns: int, samples: int, pixel_dtype: str
) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an image as stored, from its _SHAPE_COLUMNS."""
  shape = (rows, columns) + ((samples,) if samples > 1 else ())
  return shape, np.dtype(pixel_dtype).newbyteorder('<')


def image_of(row: dict, rescale: bool = False) -> np.ndarray:
  """A row's image as stored, shape (rows, columns[, samples]).

  Args:
    row: a slice row (a dict, e.g. from ``Table.to_pylist()``).
    rescale: apply ``rescale_slope`` and ``rescale_intercept`` (1 and 0 when
      absent), returning float64.
  """
  shape, dtype = _image_type(*(row[name] for name in _SHAPE_COLUMNS))
  image = np.frombuffer(row['image'], dtype=dtype).reshape(shape)
  if not rescale:
    return image
  slope = row['rescale_slope'] if row['rescale_slope'] is not None else 1.0
  intercept = row['rescale_intercept'] if row['rescale_intercept'] is not None else 0.0
  return image.astype(np.float64) * slope + intercept


def unpack_mask(data: bytes, rows: int, columns: int) -> np.ndarray:
  """Inverse of ``numpy.packbits``: the (rows, columns) boolean mask."""
  bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=rows * columns)
  return bits.astype(bool).reshape(rows, columns)


def mask_of(row: dict, kind: str) -> np.ndarray | None:
  """A row's ``i`` (inner) or ``o`` (outer) mask, or None if it has none."""
  data = row[f'{kind}_mask']
  if data is None:
    return None
  return unpack_mask(data, row['rows'], row['columns'])


def row_groups(output: str, version: int | None = None) -> list[tuple[str, int]]:
  """Every (shard path, row group index) of a version's slices, in a stable
  order.

  Raises:
    DatasetError: the dataset is not as its run wrote it (see :func:`check`).
  """
  return _row_groups(output, check(output, version=version))


def _row_groups(
  output: str,
  summary: dict,
  labeled_only: bool = False,
  footers: dict[str, pq.FileMetaData] | None = None,
  patients: frozenset[str] | None = None,
) -> list[tuple[str, int]]:
  """Every (shard, row group); with ``labeled_only``, those whose statistics
  do not prove that they hold no mask (the pipeline writes a chunk's
  labeled slices in a row group of their own); with ``patients``, those
  whose patient_id statistics may hold one of them. ``footers`` receives
  each shard's parsed footer."""
  wanted = None if patients is None else sorted(patients)
  groups = []
  for name in sorted(summary[digests.FILES]):
    if name.startswith(schema.SLICES_DIR + '/'):
      path = os.path.join(output, name)
      metadata = pq.read_metadata(path)
      if footers is not None:
        footers[path] = metadata
      witnesses = _mask_witnesses(metadata) if labeled_only else None
      ids = metadata.schema.names.index('patient_id') if wanted is not None else None
      groups += [
        (path, i)
        for i in range(metadata.num_row_groups)
        if not (witnesses and _holds_no_mask(metadata.row_group(i), witnesses))
        and (ids is None or _may_hold(metadata.row_group(i).column(ids), wanted))
      ]
  return groups


def _may_hold(column: pq.ColumnChunkMetaData, wanted: list[str]) -> bool:
  """False when the chunk's min/max statistics exclude every id of the
  sorted ``wanted``."""
  stats = column.statistics
  if stats is None or not stats.has_min_max:
    return True
  at = bisect.bisect_left(wanted, stats.min)
  return at < len(wanted) and wanted[at] <= stats.max


# A mask is drawn exactly when its contour's vertex count is set; the counts
# carry statistics (null counts), the masks do not (transforms/write.py).
_MASK_WITNESSES = ('i_vertex_count', 'o_vertex_count')


def _mask_witnesses(metadata: pq.FileMetaData) -> list[int] | None:
  """The column indices of _MASK_WITNESSES in a shard (None when it has
  not got them: not a pipeline's slice table, so every row group is read)."""
  names = metadata.schema.names
  if not all(name in names for name in _MASK_WITNESSES):
    return None
  return [names.index(name) for name in _MASK_WITNESSES]


def _holds_no_mask(group: pq.RowGroupMetaData, witnesses: list[int]) -> bool:
  """True when the row group's statistics show no row with a mask."""
  for column in witnesses:
    stats = group.column(column).statistics
    if stats is None or not stats.has_null_count or stats.null_count < group.num_rows:
      return False
  return True


class Selection(NamedTuple):
  """Which slices a reader yields (see iter_batches' arguments)."""

  labeled_only: bool = False
  split: str | None = None
  patients: frozenset[str] | None = None  # None: every patient
  exclude_flags: tuple[str, ...] = ()

  def columns(self) -> list[str]:
    """The columns its filters read."""
    needed = ['i_mask', 'o_mask'] if self.labeled_only else []
    needed += ['split'] if self.split is not None else []
    needed += ['patient_id'] if self.patients is not None else []
    return needed + (['qa_flags'] if self.exclude_flags else [])


def _keep(table: pa.Table, selection: Selection) -> pa.Table:
  """The rows to yield (the table itself, not a copy, when that is all)."""
  tests = []
  if selection.labeled_only:
    tests.append(schema.has_mask(table))
  if selection.split is not None:
    tests.append(pc.equal(table['split'], selection.split))
  if selection.patients is not None:
    tests.append(pc.is_in(table['patient_id'], pa.array(sorted(selection.patients))))
  if selection.exclude_flags:
    tests.append(labels.without_flags(table, selection.exclude_flags))
  if not tests:
    return table
  keep = tests[0]
  for test in tests[1:]:
    keep = pc.and_(keep, test)
  if pc.all(keep).as_py():
    return table
  return table.filter(keep)


def folds(
  output: str,
  k: int,
  *,
  split: str | None = None,
  labeled_only: bool = False,
  version: int | None = None,
) -> list[list[str]]:
  """The patients of a version in ``k`` folds for cross-validation.

  The patients (those of ``split`` if given, with a labeled slice if
  ``labeled_only``) are ordered by the hash position of their patient_id
  (SHA-256, as the splits use) and dealt out in turn: fold sizes differ by
  at most one, every fold has a patient when there are at least ``k``, and
  the folds depend only on the set of patients (a new patient may move
  others: folds are drawn at read time, for a fixed dataset version).

  Raises:
    ValueError: ``k`` below 2, or fewer patients than folds.
  """
  summary = check(output, version=version)
  return _folds(output, summary, k, split, labeled_only)


def _folds(
  output: str,
  summary: dict,
  k: int,
  split: str | None,
  labeled_only: bool,
  patients: frozenset[str] | None = None,
) -> list[list[str]]:
  if k < 2:
    raise ValueError(f'folds must be at least 2, got {k}')
  _check_split(split)
  table = _dataset(output, summary).to_table(
    columns=['patient_id', 'split', *_MASK_WITNESSES]
  )
  keep = None
  if labeled_only:
    keep = pc.or_(*(pc.is_valid(table[name]) for name in _MASK_WITNESSES))
  if split is not None:
    in_split = pc.equal(table['split'], split)
    keep = in_split if keep is None else pc.and_(keep, in_split)
  ids = table['patient_id'] if keep is None else table.filter(keep)['patient_id']
  found = pc.unique(ids).to_pylist()
  if patients is not None:
    found = [p for p in found if p in patients]
  patients = sorted(found, key=lambda p: (splits.patient_position(p), p))
  if len(patients) < k:
    raise ValueError(
      f'{len(patients)} patients cannot make {k} folds'
      + (f' (split {split!r})' if split else '')
    )
  return [sorted(patients[i::k]) for i in range(k)]


def _check_split(split: str | None) -> None:
  if split is not None and split not in splits.SPLITS:
    raise ValueError(f'split must be one of {", ".join(splits.SPLITS)}, got {split!r}')


def _selection(
  output: str,
  summary: dict,
  labeled_only: bool,
  split: str | None,
  patients: Iterable[str] | None,
  folds: int | None,
  fold: int | None,
  holdout: bool,
  exclude_flags: Iterable[str],
) -> Selection:
  """The Selection of a reader's arguments: the fold resolved to patients.

  Raises:
    ValueError: a split that is not one, a fold without folds (or out of
      range), or a name that is not a quality flag.
  """
  _check_split(split)
  flags = labels.check_flags(exclude_flags)
  if isinstance(patients, str):
    raise ValueError('patients must be a collection of patient ids, not one string')
  chosen = None if patients is None else frozenset(patients)
  if (folds is None) != (fold is None):
    raise ValueError('folds and fold go together: folds=K, fold=i (0 <= i < K)')
  if holdout and folds is None:
    raise ValueError('holdout=True needs folds=K and fold=i')
  if folds is not None:
    if not 0 <= fold < folds:
      raise ValueError(f'fold must be in 0..{folds - 1}, got {fold}')
    dealt = _folds(output, summary, folds, split, labeled_only, chosen)
    part = (
      set(dealt[fold]) if holdout else set().union(*dealt[:fold], *dealt[fold + 1 :])
    )
    chosen = frozenset(part if chosen is None else part & chosen)
  return Selection(labeled_only, split, chosen, flags)


def _dataset(output: str, summary: dict) -> pads.Dataset:
  shards = sorted(
    n for n in summary[digests.FILES] if n.startswith(schema.SLICES_DIR + '/')
  )
  return pads.dataset(
    [os.path.join(output, n) for n in shards],
    format=_parquet_format(),
    schema=schema.SLICE_SCHEMA,
  )


class _Buffers:
  """Image buffers recycled between the rows of a read: a row's image is
  copied out of its row group (so the row group is freed once read) into a
  buffer that goes back here when its batch is built. A fresh 128 KiB
  buffer per image costs about ten times the copy (page faults on new
  memory; bench/reads.py). A buffer is made only when none is free, so
  there are never more than the most rows held at once (the shuffle buffer,
  a row group and a batch); at most ``keep`` free ones of a size are kept."""

  def __init__(self, keep: int):
    self._keep = keep
    self._free: dict[int, list[np.ndarray]] = {}

  def copy(self, view: np.ndarray) -> np.ndarray:
    free = self._free.get(view.nbytes)
    buffer = free.pop() if free else np.empty(view.nbytes, np.uint8)
    buffer[:] = view
    return buffer

  def give_back(self, buffers: list) -> None:
    for buffer in buffers:
      if buffer is not None:
        free = self._free.setdefault(buffer.nbytes, [])
        if len(free) < self._keep:
          free.append(buffer)


def _binary_views(column: pa.ChunkedArray):
  """Each value of a binary column as a uint8 view into Arrow's buffer
  (None for a null), without a ``bytes`` object per value."""
  for chunk in column.chunks:
    _, offsets, data = chunk.buffers()
    width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
    ends = np.frombuffer(offsets, width)[chunk.offset : chunk.offset + len(chunk) + 1]
    values = np.empty(0, np.uint8) if data is None else np.frombuffer(data, np.uint8)
    valid = chunk.is_valid().to_pylist() if chunk.null_count else None
    for k in range(len(chunk)):
      yield values[ends[k] : ends[k + 1]] if valid is None or valid[k] else None


def _rows_of(table: pa.Table, buffers: _Buffers) -> list[tuple]:
  """The table's rows as tuples in column order, images copied into
  ``buffers`` (uint8 arrays), every other value as ``to_pylist`` gives it."""
  columns = []
  for name, column in zip(table.column_names, table.columns, strict=True):
    if name == 'image':
      views = _binary_views(column)
      columns.append([v if v is None else buffers.copy(v) for v in views])
    else:
      columns.append(column.to_pylist())
  return list(zip(*columns, strict=True))


def shuffled_rows(
  output: str,
  seed: int,
  epoch: int = 0,
  *,
  labeled_only: bool = False,
  split: str | None = None,
  patients: Iterable[str] | None = None,
  folds: int | None = None,
  fold: int | None = None,
  holdout: bool = False,
  exclude_flags: Iterable[str] = (),
  columns: list[str] | None = None,
  shuffle_buffer: int = 512,
  shard: tuple[int, int] = (0, 1),
  version: int | None = None,
):
  """Yields every selected row once, as a dict, in a seeded random order.

  Row groups are visited in a random order, and rows pass through a shuffle
  buffer of ``shuffle_buffer`` rows: at most that many rows plus one row
  group (one chunk of one patient) are held in memory at once, however large
  the dataset. The order depends only on (seed, epoch) and the dataset.

  Args:
    split, patients, folds, fold, holdout, exclude_flags: which rows, as in
      :func:`iter_batches`.
    shard: (index, count): yield only this share of the row groups, so that
      ``count`` readers (e.g. DataLoader workers) together yield each row once.
    version: the dataset version to read (default: the latest).
  """
  summary = check(output, version=version)
  selection = _selection(
    output,
    summary,
    labeled_only,
    split,
    patients,
    folds,
    fold,
    holdout,
    exclude_flags,
  )
  buffers = _Buffers(keep=shuffle_buffer)
  rows = _shuffled(
    output, summary, seed, epoch, selection, columns, shuffle_buffer, shard, buffers
  )
  for names, row in rows:
    values = dict(zip(names, row, strict=True))
    image = values.get('image')
    if image is not None:
      values['image'] = image.tobytes()
      buffers.give_back([image])
    yield values


def _shuffled(
  output: str,
  summary: dict,
  seed: int,
  epoch: int,
  selection: Selection,
  columns: list[str] | None,
  shuffle_buffer: int,
  shard: tuple[int, int],
  buffers: _Buffers,
):
  """shuffled_rows' rows as (column names, tuple), images as ``buffers``'
  arrays, which the caller gives back."""
  rng = np.random.default_rng([seed, epoch])
  footers: dict[str, pq.FileMetaData] = {}
  groups = _row_groups(
    output, summary, selection.labeled_only, footers, selection.patients
  )
  order = rng.permutation(len(groups))[shard[0] :: shard[1]]
  wanted = None
  if columns is not None:
    extra = [*_SHAPE_COLUMNS, *selection.columns()]
    wanted = list(dict.fromkeys([*columns, *extra]))
  buffer: list[tuple] = []
  kept = 0
  opened: dict[str, pq.ParquetFile] = {}  # each opened once: opening has a cost
  for g in order:
    path, index = groups[g]
    if path not in opened:
      opened[path] = _open_shard(path, summary, footers[path])
    table = _keep(opened[path].read_row_group(index, columns=wanted), selection)
    names = table.column_names
    for row in _rows_of(table, buffers):
      kept += 1
      buffer.append((names, row))
      if len(buffer) >= shuffle_buffer:
        pick = int(rng.integers(len(buffer)))
        buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
        yield buffer.pop()
  rng.shuffle(buffer)
  if selection.split is not None and not kept and shard[1] == 1:
    warnings.warn(
      f'split {selection.split!r} holds no slices in {output}'
      + (' among the chosen patients' if selection.patients is not None else '')
      + ": no patient is in it (the run summary's splits line shows each "
      "split's patients)",
      stacklevel=3,
    )
  yield from buffer


def _column_array(values: list) -> np.ndarray:
  """A typed array, or a 1-D object array when values hold nulls or ragged lists."""
  if None not in values:
    try:
      return np.array(values)
    except ValueError:
      pass
  array = np.empty(len(values), dtype=object)
  array[:] = values
  return array


def _images(images: tuple, types: list[tuple[tuple[int, ...], np.dtype]]):
  """The images (uint8 buffers) copied out, each with its (shape, dtype):
  one array (batch, ...) when they share shape and dtype, else a list."""
  if len(set(types)) > 1:
    return [
      np.frombuffer(image, dtype).reshape(shape).copy()
      for image, (shape, dtype) in zip(images, types, strict=True)
    ]
  shape, dtype = types[0]
  batch = np.empty((len(images), *shape), dtype)
  flat = batch.reshape(len(images), -1).view(np.uint8)
  for k, image in enumerate(images):
    flat[k] = image
  return batch


def _masks(packed: list, shapes: list[tuple[int, int]]):
  """Packed masks unpacked: one bool array (batch, rows, columns), False
  where a row has none, when the rows share a shape, else a list (None
  where a row has none). Masks whose bits fill whole bytes are unpacked
  in one call."""
  if len(set(shapes)) > 1:
    return [
      None if data is None else unpack_mask(data, *shape)
      for data, shape in zip(packed, shapes, strict=True)
    ]
  rows, columns = shapes[0]
  size = rows * columns
  if size % 8 == 0 and all(data is None or len(data) == size // 8 for data in packed):
    empty = bytes(size // 8)
    joined = b''.join(empty if data is None else data for data in packed)
    bits = np.unpackbits(np.frombuffer(joined, np.uint8))
    return bits.view(bool).reshape(len(packed), rows, columns)
  none = np.zeros((rows, columns), bool)
  return np.stack(
    [none if data is None else unpack_mask(data, rows, columns) for data in packed]
  )


def _stack(items: list[tuple], buffers: _Buffers) -> dict:
  """Rows (column names, tuple) -> one dict of stacked columns."""
  names = items[0][0]
  at = {name: k for k, name in enumerate(names)}
  by_column = list(zip(*(row for _, row in items), strict=True))
  batch = {}
  for name in names:
    values = by_column[at[name]]
    if name == 'image':
      shapes = zip(*(by_column[at[c]] for c in _SHAPE_COLUMNS), strict=True)
      batch['image'] = _images(values, [_image_type(*shape) for shape in shapes])
    elif name in ('i_mask', 'o_mask'):
      batch[f'has_{name}'] = np.array([v is not None for v in values])
      shapes = zip(by_column[at['rows']], by_column[at['columns']], strict=True)
      batch[name] = _masks(values, list(shapes))
    else:
      batch[name] = _column_array(values)
  if 'image' in at:
    buffers.give_back(by_column[at['image']])
  return batch


class View(NamedTuple):
  """What a reader makes of each slice besides its columns (iter_batches'
  arguments of the same names)."""

  float_image: bool = False
  normalize: str | Callable | None = None
  label_map: bool = False
  ignore_index: int | None = None
  geometry: bool = False

  def columns(self) -> list[str]:
    """The columns it reads."""
    needed = list(prepare.FLOAT_COLUMNS) if self.float_image else []
    needed += prepare.LABEL_COLUMNS if self.label_map else ()
    return needed + list(prepare.GEOMETRY_COLUMNS if self.geometry else ())

  def keys(self) -> list[str]:
    """The keys it adds."""
    added = ['image'] if self.float_image else []
    added += ['label'] if self.label_map else []
    return added + (['affine', 'affine_ras'] if self.geometry else [])

  def apply(self, batch: dict) -> dict:
    """Adds the view's keys to a stacked batch (and makes ``image`` float)."""
    if self.float_image:
      batch['image'] = prepare.float_images(
        batch['image'],
        batch['rescale_slope'],
        batch['rescale_intercept'],
        self.normalize,
      )
    if self.label_map:
      batch['label'] = _label_maps(batch, self.ignore_index)
    if self.geometry:
      batch['affine'] = prepare.affines(
        batch['image_position_patient'],
        batch['image_orientation_patient'],
        batch['pixel_spacing'],
        batch['slice_thickness'],
      )
      batch['affine_ras'] = prepare.ras(batch['affine'])
    return batch


def _label_maps(batch: dict, ignore: int | None):
  """The batch's label maps: one array, or a list when shapes differ."""
  inner, outer = batch['i_mask'], batch['o_mask']
  has_i, has_o = batch['has_i_mask'], batch['has_o_mask']
  if not isinstance(inner, list):
    return prepare.label_maps(inner, outer, has_i, has_o, ignore)
  maps = []
  for k, (i, o) in enumerate(zip(inner, outer, strict=True)):
    empty = np.zeros((1, batch['rows'][k], batch['columns'][k]), bool)
    i = empty if i is None else i[None]
    o = empty if o is None else o[None]
    maps.append(prepare.label_maps(i, o, has_i[k : k + 1], has_o[k : k + 1], ignore)[0])
  return maps


def iter_batches(
  output: str,
  batch_size: int,
  seed: int = 0,
  epochs: int = 1,
  *,
  labeled_only: bool = False,
  split: str | None = None,
  patients: Iterable[str] | None = None,
  folds: int | None = None,
  fold: int | None = None,
  holdout: bool = False,
  exclude_flags: Iterable[str] = (),
  columns: list[str] | None = None,
  float_image: bool = False,
  normalize: str | Callable | None = None,
  label_map: bool = False,
  ignore_index: int | None = None,
  geometry: bool = False,
  transform: Callable[[dict], dict] | None = None,
  shuffle_buffer: int = 512,
  drop_last: bool = False,
  shard: tuple[int, int] = (0, 1),
  version: int | None = None,
):
  """Yields dicts of stacked numpy arrays, shuffled, epoch after epoch.

  ``image`` becomes an array (batch, rows, columns[, samples]) of the stored
  dtype (a list of arrays if shapes differ within the batch); ``i_mask`` and
  ``o_mask`` become bool arrays (batch, rows, columns), all False where the
  slice has no such mask, with ``has_i_mask`` / ``has_o_mask`` saying which.
  Other columns become 1-D arrays (object arrays when they hold nulls).

  Args:
    output: a pipeline output folder.
    batch_size: rows per batch; the last batch of an epoch may be smaller
      unless ``drop_last``.
    seed: the same seed gives the same order; each epoch has its own order.
    epochs: how many passes; every selected slice appears once per epoch.
    labeled_only: only slices with at least one mask (inner or outer).
    split: only slices of this split ('train', 'val' or 'test'); warns
      (UserWarning) when it holds none.
    patients: only slices of these patient ids.
    folds, fold: patient-level cross-validation (see :func:`folds`): the
      selected patients dealt into ``folds`` folds; yields the patients of
      every fold but ``fold`` (for training), or with ``holdout`` those of
      ``fold`` alone (for validation).
    exclude_flags: leave out slices with any of these quality flags (e.g.
      ``['duplicate_contour']``).
    columns: the columns to return (default all); only these (and what is
      needed to decode, filter and view them) are read from disk.
    float_image: ``image`` as float32 (batch, channels, rows, columns),
      rescale slope and intercept applied (1 and 0 when absent).
    normalize: with ``float_image``, per image: 'zscore', 'minmax' or a
      callable on one (channels, rows, columns) array.
    label_map: add ``label``, uint8 (batch, 1, rows, columns): 0 background,
      1 blood pool, 2 myocardium (``labels``; ``ignore_index``: the value
      of pixels the drawn contours do not decide).
    geometry: add ``affine`` (batch, 4, 4): the LPS affine of each slice for
      the index (row, column, k) (``geometry``), and ``affine_ras``; NaN
      where a slice's geometry is missing.
    transform: called on each batch dict; its result is yielded.
    shuffle_buffer: rows held for shuffling (memory bound; 1 = no shuffle
      within row groups, row groups still in random order).
    shard: see :func:`shuffled_rows`.
    version: the dataset version to read (default: the latest; every epoch
      reads the same one, whatever runs commit meanwhile).

  Raises:
    ValueError: an argument out of range (see the arguments).
    DatasetError: the dataset is not as its run wrote it (see :func:`check`).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be at least 1, got {batch_size}')
  view = View(float_image, normalize, label_map, ignore_index, geometry)
  if normalize is not None and not float_image:
    raise ValueError('normalize needs float_image=True')
  labels.check_ignore(ignore_index)
  summary = check(output, version=version)
  selection = _selection(
    output,
    summary,
    labeled_only,
    split,
    patients,
    folds,
    fold,
    holdout,
    exclude_flags,
  )
  wanted = None
  if columns is not None:
    wanted = list(dict.fromkeys([*columns, *view.columns()]))
  keys = None
  if columns is not None:
    keys = list(
      dict.fromkeys(
        [
          *columns,
          *(f'has_{c}' for c in columns if c in ('i_mask', 'o_mask')),
          *view.keys(),
        ]
      )
    )
  buffers = _Buffers(keep=shuffle_buffer + batch_size)

  def finish(items: list[tuple]) -> dict:
    batch = view.apply(_stack(items, buffers))
    if keys is not None:
      batch = {key: batch[key] for key in keys}
    return batch if transform is None else transform(batch)

  for epoch in range(epochs):
    batch: list[tuple] = []
    for item in _shuffled(
      output, summary, seed, epoch, selection, wanted, shuffle_buffer, shard, buffers
    ):
      batch.append(item)
      if len(batch) == batch_size:
        yield finish(batch)
        batch = []
    if batch and not drop_last:
      yield finish(batch)
