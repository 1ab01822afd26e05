"""Per-patient work: plan slice chunks, decode DICOM, rasterise contours.

A matched Patient fans out into SliceChunks of at most ``chunk_size`` slices
(the only fan-out in the pipeline, so a Reshuffle follows it). Each chunk is
decoded into one Arrow table, which becomes one Parquet row group: common
uncompressed slices by the native reader in the worker, the rest by pydicom
(``decode_dicom``), isolated in a child process by default.
"""

from __future__ import annotations

import gc
import io
import logging
import math
import uuid
import warnings
from collections.abc import Callable
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pydicom
import pydicom.config
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from pydicom.errors import InvalidDicomError

from beam_pipeline import report, splits
from beam_pipeline import schema as s
from beam_pipeline.errors import ContourError, DicomError
from transforms import _isolate, _malloc, _native, masks, quality
from transforms._isolate import DecoderPool, InProcessDecoder, IsolatedDecoder
from transforms.reconcile import Patient

_LOG = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_DECODE_TIMEOUT = 120.0


class SliceTask(NamedTuple):
  """One slice to decode, with the paths of its contours (None if absent)."""

  slice_index: int
  dicom_path: str
  i_contour: str | None
  o_contour: str | None


class SliceChunk(NamedTuple):
  """Up to chunk_size slices of one patient."""

  patient_id: str
  original_id: str
  chunk: int
  chunks: int
  slices: tuple[SliceTask, ...]


def plan_chunks(
  patient: Patient, chunk_size: int, labeled_only: bool = False
) -> list[SliceChunk]:
  """Splits a patient's slices into chunks of nearly equal size, in slice order.

  ``ceil(n / chunk_size)`` chunks whose sizes differ by at most one (230
  slices at 64 make 57, 58, 57, 58, not 64, 64, 64, 38): runners deal work
  items out by count, so even items keep every worker busy to the end.
  With ``labeled_only``, only slices with at least one contour file are kept;
  a patient without any then yields no chunk.
  """
  contours: dict[int, dict[str, str]] = {}
  for contour in patient.contours:
    contours.setdefault(contour.slice_index, {})[contour.kind] = contour.path
  tasks = [
    SliceTask(
      d.slice_index,
      d.path,
      contours.get(d.slice_index, {}).get('i'),
      contours.get(d.slice_index, {}).get('o'),
    )
    for d in patient.slices
    if not labeled_only or d.slice_index in contours
  ]
  if not tasks:
    return []
  count = math.ceil(len(tasks) / chunk_size)
  bounds = [k * len(tasks) // count for k in range(count + 1)]
  return [
    SliceChunk(
      patient.patient_id,
      patient.original_id,
      k,
      count,
      tuple(tasks[bounds[k] : bounds[k + 1]]),
    )
    for k in range(count)
  ]


def _value(ds: pydicom.Dataset, keyword: str, convert, count: int = 0):
  """A typed tag value, or None when absent, empty or malformed."""
  element = ds.get(keyword)
  if element is None or element == '':
    return None
  try:
    if count:
      values = [convert(v) for v in element]
      return values if len(values) == count else None
    return convert(element)
  except (TypeError, ValueError):
    return None


# Uncompressed transfer syntaxes and their byte order.
_NATIVE_SYNTAXES = {
  pydicom.uid.ExplicitVRLittleEndian: '<',
  pydicom.uid.ImplicitVRLittleEndian: '<',
  pydicom.uid.ExplicitVRBigEndian: '>',
}


def _native_pixels(
  ds: pydicom.Dataset, rows: int, columns: int, samples: int
) -> np.ndarray | None:
  """The pixels of a common uncompressed image (see :func:`_native.pixels`),
  or None for pydicom's decoder."""
  order = _NATIVE_SYNTAXES.get(ds.file_meta.get('TransferSyntaxUID'))
  if order is None or 'PixelData' not in ds:
    return None
  return _native.pixels(
    ds.PixelData,
    order,
    rows,
    columns,
    samples,
    ds.get('BitsAllocated'),
    ds.get('BitsStored'),
    ds.get('PixelRepresentation'),
  )


def decode_dicom(
  data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[dict, np.ndarray]:
  """Decodes one single-frame DICOM file.

  The file must start with the DICOM preamble and "DICM" prefix (pydicom's
  ``force`` is not used: a file without them is rejected, not guessed at).
  Compressed transfer syntaxes decode through pydicom's plugins.

  Args:
    data: the file's bytes.
    max_pixels: the largest rows x columns x samples x frames accepted,
      checked from the header before any pixel buffer is allocated.

  Returns:
    (metadata, image): metadata holds the typed DICOM columns of
    SLICE_SCHEMA; image is pixel_array, unscaled, C-contiguous, little-endian.

  Raises:
    DicomError: with the reason the file cannot be used.
  """
  # Real trees hold UIDs with leading-zero components; pydicom would warn
  # once per file. Values are read as they are.
  pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    try:
      ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as e:
      raise DicomError(
        'not a DICOM file: no "DICM" prefix after the 128-byte preamble'
      ) from e
    except Exception as e:  # pydicom raises many types on corrupt headers.
      raise DicomError(f'unreadable DICOM header: {type(e).__name__}: {e}') from e
    missing = [k for k in ('Rows', 'Columns', 'PixelData') if k not in ds]
    if missing:
      raise DicomError(f'no {", ".join(missing)} in the dataset')
    rows = _value(ds, 'Rows', int)
    columns = _value(ds, 'Columns', int)
    samples = _value(ds, 'SamplesPerPixel', int) or 1
    frames = _value(ds, 'NumberOfFrames', int) or 1
    if not rows or not columns:
      raise DicomError(f'invalid image size {rows} x {columns}')
    if frames != 1:
      raise DicomError(
        f'multi-frame image ({frames} frames); only single-frame slices are supported'
      )
    if rows * columns * samples > max_pixels:
      raise DicomError(
        f'image of {rows} x {columns} x {samples} samples exceeds '
        f'--max-pixels {max_pixels}'
      )
    try:
      image = _native_pixels(ds, rows, columns, samples)
      if image is None:
        image = ds.pixel_array
    except Exception as e:  # Each pixel handler raises its own types.
      raise DicomError(f'pixel data cannot be decoded: {type(e).__name__}: {e}') from e
    expected = (rows, columns) if samples == 1 else (rows, columns, samples)
    if image.shape != expected:
      raise DicomError(
        f'decoded shape {image.shape} does not match the header {expected}'
      )
    image = np.ascontiguousarray(
      image.astype(image.dtype.newbyteorder('<'), copy=False)
    )
    meta = {
      'sop_instance_uid': _value(ds, 'SOPInstanceUID', str),
      'series_instance_uid': _value(ds, 'SeriesInstanceUID', str),
      'study_instance_uid': _value(ds, 'StudyInstanceUID', str),
      'modality': _value(ds, 'Modality', str),
      'transfer_syntax_uid': _value(ds.file_meta, 'TransferSyntaxUID', str),
      'instance_number': _value(ds, 'InstanceNumber', int),
      'rows': rows,
      'columns': columns,
      'samples_per_pixel': samples,
      'photometric_interpretation': _value(ds, 'PhotometricInterpretation', str),
      'bits_allocated': _value(ds, 'BitsAllocated', int),
      'bits_stored': _value(ds, 'BitsStored', int),
      'pixel_representation': _value(ds, 'PixelRepresentation', int),
      'pixel_dtype': image.dtype.name,
      'pixel_spacing': _value(ds, 'PixelSpacing', float, 2),
      'slice_thickness': _value(ds, 'SliceThickness', float),
      'slice_location': _value(ds, 'SliceLocation', float),
      'image_position_patient': _value(ds, 'ImagePositionPatient', float, 3),
      'image_orientation_patient': _value(ds, 'ImageOrientationPatient', float, 6),
      'rescale_slope': _value(ds, 'RescaleSlope', float),
      'rescale_intercept': _value(ds, 'RescaleIntercept', float),
      'trigger_time': _value(ds, 'TriggerTime', float),
    }
  return meta, image


class PlanChunksFn(beam.DoFn):
  """Patient -> SliceChunks."""

  def __init__(self, chunk_size: int, labeled_only: bool):
    self._chunk_size = chunk_size
    self._labeled_only = labeled_only

  def process(self, patient: Patient):
    yield from plan_chunks(patient, self._chunk_size, self._labeled_only)


class DecodeSlicesFn(beam.DoFn):
  """SliceChunk -> one Arrow table of slice rows; unusable inputs as ERRORS."""

  ERRORS = 'errors'

  def __init__(
    self,
    input_root: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    split_fractions: tuple[float, float, float] = splits.parse_fractions(
      splits.DEFAULT_FRACTIONS
    ),
    isolate: bool = True,
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT,
    decode_fn: Callable[[bytes, int], tuple[dict, np.ndarray]] = decode_dicom,
    decoders: int = 1,
    progress_seconds: float = report.PROGRESS_SECONDS,
  ):
    """Args:
    input_root: the data tree; task paths are relative to it.
    max_pixels: see :func:`decode_dicom`.
    split_fractions: train/val/test fractions for the split column.
    isolate: decode with ``decode_fn`` in a child process, so that a decoder
      crash or hang costs one slice, not the worker (see transforms._isolate).
    decode_timeout: seconds one file may take to decode when isolated.
    decoders: decoder children per worker (isolated only).
    progress_seconds: at most one progress line per this many seconds.
    decode_fn: the decoder of the files the native reader (transforms._native,
      always in the worker) declines; a module-level function.
    """
    # Made here, on the launching machine, so every worker's copy shares it.
    self._run_id = uuid.uuid4().hex
    self._input_root = input_root
    self._max_pixels = max_pixels
    self._split_fractions = split_fractions
    self._isolate = isolate
    self._decode_timeout = decode_timeout
    self._decode_fn = decode_fn
    self._decoders = decoders
    self._progress_seconds = progress_seconds

  def setup(self):
    _malloc.keep_freed_memory()
    # The worker's long-lived objects (Beam, pydicom, pyarrow) need no more
    # cycle collection: freezing them saves every later collection the walk.
    gc.freeze()
    counter = lambda name: Metrics.counter(report.NAMESPACE, name)  # noqa: E731
    self._patients = counter(report.PATIENTS_DONE)
    self._slices = counter(report.SLICES_WRITTEN)
    self._masks = {
      'i': counter(report.I_MASKS_WRITTEN),
      'o': counter(report.O_MASKS_WRITTEN),
    }
    self._bytes = counter(report.SLICE_BYTES_READ)
    self._flags = {flag: counter(report.qa_counter(flag)) for flag in quality.QA_FLAGS}
    self._progress = report.progress(self._run_id, self._progress_seconds)
    if self._isolate:
      self._decoder = DecoderPool(
        [
          IsolatedDecoder(self._input_root, self._decode_fn, self._decode_timeout)
          for _ in range(self._decoders)
        ]
      )
    else:
      self._decoder = InProcessDecoder(self._input_root, self._decode_fn)

  def teardown(self):
    self._decoder.close()

  def process(self, chunk: SliceChunk):
    rows = []
    split = splits.assign_split(chunk.patient_id, self._split_fractions)
    outcomes = self._decode_all([task.dicom_path for task in chunk.slices])
    for task, outcome in zip(chunk.slices, outcomes, strict=True):
      row = yield from self._slice_row(chunk, task, outcome, split)
      if row is not None:
        rows.append(row)
    done = int(chunk.chunk == chunk.chunks - 1)
    self._patients.inc(done)
    self._slices.inc(len(rows))
    self._progress.add(patients=done, slices=len(rows))
    if rows:
      yield pa.Table.from_pylist(rows, schema=s.SLICE_SCHEMA)

  def _decode_all(self, paths: list[str]) -> list[_isolate.Outcome]:
    """One outcome per path, in order (see transforms._isolate).

    The native reader takes what it can here, in the worker; the rest goes to
    pydicom, in the decoder child when isolated.
    """
    outcomes: list = [None] * len(paths)
    rest, data_of_rest = [], []
    for i, path in enumerate(paths):
      data, failed = _isolate.read(self._input_root, path)
      if failed is not None:
        outcomes[i] = failed
        continue
      try:
        fast = _native.decode(data, self._max_pixels)
      except Exception:  # a bug in the fast path: let pydicom decide
        _LOG.exception('native reader failed on %s', path)
        fast = None
      if fast is None:
        rest.append(i)
        data_of_rest.append(data)
      else:
        outcomes[i] = 'ok', (*fast, len(data))
    decoded = self._decoder.decode_all(
      [paths[i] for i in rest], self._max_pixels, data_of_rest
    )
    for i, outcome in zip(rest, decoded, strict=True):
      outcomes[i] = outcome
    return outcomes

  def _error(self, chunk, path, stage, message):
    return pvalue.TaggedOutput(
      self.ERRORS, s.error_row(chunk.patient_id, path, stage, message)
    )

  def _read(self, chunk: SliceChunk, path: str):
    """Yields an error row if unreadable; returns the bytes, or None."""
    data, failed = _isolate.read(self._input_root, path)
    if failed is not None:
      yield self._error(chunk, path, s.STAGE_READ, failed[1])
    return data

  def _slice_row(self, chunk: SliceChunk, task: SliceTask, outcome, split: str):
    """Yields error rows; returns the slice's row, or None if unusable."""
    kind, payload = outcome
    if kind != 'ok':
      contours = [p for p in (task.i_contour, task.o_contour) if p]
      unused = (
        f' ({len(contours)} contour file(s) of this slice not used)' if contours else ''
      )
      stage = s.STAGE_READ if kind == 'read_error' else s.STAGE_DECODE
      yield self._error(chunk, task.dicom_path, stage, f'{payload}{unused}')
      return None
    meta, image, size = payload
    self._bytes.inc(size)
    pixel_columns, flags = quality.pixel_checks(
      image, meta['bits_stored'], meta['pixel_representation']
    )
    row = {
      'patient_id': chunk.patient_id,
      'original_id': chunk.original_id,
      'slice_index': task.slice_index,
      'split': split,
      'dicom_path': task.dicom_path,
      **meta,
      **pixel_columns,
      'image': image.tobytes(),
    }
    mask_arrays = {}
    for kind, path in (('i', task.i_contour), ('o', task.o_contour)):
      row[f'{kind}_mask'] = None
      if path is None:
        continue
      data = yield from self._read(chunk, path)
      if data is None:
        continue
      try:
        vertices = masks.parse_contour(data)
        mask = masks.rasterise(vertices, meta['rows'], meta['columns'])
      except ContourError as e:
        yield self._error(chunk, path, s.STAGE_CONTOUR, str(e))
        continue
      except Exception as e:  # MemoryError or a rasteriser bug: this mask only.
        _LOG.warning('%s: %s: %s', path, type(e).__name__, e)
        yield self._error(chunk, path, s.STAGE_CONTOUR, f'{type(e).__name__}: {e}')
        continue
      row[f'{kind}_mask'] = masks.pack_mask(mask)
      self._masks[kind].inc()
      contour_columns, contour_flags = quality.contour_checks(kind, vertices, mask)
      row.update(contour_columns)
      flags += contour_flags
      mask_arrays[kind] = mask
    if len(mask_arrays) == 2:
      row['inner_in_outer'], nesting_flags = quality.nesting_check(
        mask_arrays['i'], mask_arrays['o']
      )
      flags += nesting_flags
    row['qa_flags'] = flags
    for flag in flags:
      self._flags[flag].inc()
    return row
