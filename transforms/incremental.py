"""Incremental runs: which patients are decoded again, and what the others
still tell duplicate detection.

A run into an existing dataset starts from a version whose run record holds
each patient's input fingerprint (``layout.fingerprint``: the link row and
every file's path and stamp). ``SplitKept`` compares this run's fingerprints
with them: a patient whose fingerprint is unchanged is kept (its rows stay
in the version's files and none of its slices is read); every other one goes
on to the decode stage. Every matched patient's fingerprint and split go to
the staging folder (``INPUTS_FILE``), where the launcher reads them to carry
the kept patients' rows into the new version
(``beam_pipeline.launch.incremental``).

Kept patients still count in duplicate detection, so that its plan covers the
old rows as a full run's would: ``KeptIdentities`` reads their slices'
identities from the version's files (a few small columns) and hashes their
contour files, in the records the decode stage emits for decoded ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import apache_beam as beam
import pyarrow.parquet as pq
import xxhash
from apache_beam import pvalue

from transforms import _bundles
from transforms.contract import layout, packing
from transforms.contract.layout import Patient
from transforms.io import files, stores
from transforms.outcomes import Failed

# {patient_id: [fingerprint, split, whether the decode stage counts it]}
INPUTS_FILE = '_INPUTS.json'
PREVIOUS_FILE = '_PREVIOUS.json'  # {patient_id: fingerprint} of the start version

# The columns a kept slice's identity is read from (layout.slice_identity).
_IDENTITY_COLUMNS = [
  'patient_id',
  'slice_index',
  'dicom_path',
  'sop_instance_uid',
  'pixel_xxh3',
  'qa_flags',
]


class _CompareFn(beam.DoFn):
  """Patients whose fingerprint is the start version's go to KEPT."""

  def __init__(self, previous: str | None, config: stores.StoreConfig):
    self._previous = previous
    self._config = config

  def setup(self):
    stores.configure(self._config)
    self._fingerprints = (
      {} if self._previous is None else json.loads(stores.read_bytes(self._previous))
    )

  def process(self, patient: Patient) -> Iterator:
    if patient.fingerprint and self._fingerprints.get(patient.patient_id) == (
      patient.fingerprint
    ):
      yield pvalue.TaggedOutput(SplitKept.KEPT, patient)
    else:
      yield patient


class SplitKept(beam.PTransform):
  """Patients -> DECODE (changed or new) and KEPT (unchanged since the
  version at ``previous``, a PREVIOUS_FILE; None: every patient is decoded);
  writes every patient's fingerprint and split to ``inputs`` (INPUTS_FILE),
  and whether the decode stage would count it (under ``labeled_only`` a
  patient without a contour file has no slice to decode).
  """

  DECODE = 'decode'
  KEPT = 'kept'

  def __init__(
    self,
    previous: str | None,
    inputs: str,
    fractions: tuple[float, float, float],
    config: stores.StoreConfig | None = None,
    labeled_only: bool = False,
  ):
    super().__init__()
    self._previous = previous
    self._inputs = inputs
    self._fractions = fractions
    self._config = config or stores.StoreConfig()
    self._labeled_only = labeled_only

  def expand(self, patients):
    fractions, labeled_only = self._fractions, self._labeled_only

    def inputs(p: Patient) -> tuple[str, tuple]:
      # counted: the decode stage counts a patient it has a slice to decode of
      counted = not labeled_only or bool(p.contours)
      return p.patient_id, (p.fingerprint, p.split(fractions), counted)

    _ = (
      patients
      | 'Fingerprints' >> beam.Map(inputs)
      | 'AllFingerprints' >> beam.combiners.ToDict()
      | 'WriteInputs' >> beam.ParDo(_bundles.WriteJsonFn(self._inputs, self._config))
    )
    split = patients | 'Compare' >> beam.ParDo(
      _CompareFn(self._previous, self._config)
    ).with_outputs(self.KEPT, main=self.DECODE)
    return {self.DECODE: split[self.DECODE], self.KEPT: split[self.KEPT]}


@beam.typehints.with_output_types(tuple[str, bytes])
class _OldRowsFn(beam.DoFn):
  """One file of the start version -> (patient_id, packed identity columns
  of its rows in the file) for the kept patients (``kept``: None, any)."""

  def __init__(self, config: stores.StoreConfig):
    self._config = config

  def setup(self):
    stores.configure(self._config)

  def process(self, path: str, kept) -> Iterator[tuple[str, bytes]]:
    kept = set(kept)
    with stores.readable(path) as f:
      table = pq.read_table(f, columns=_IDENTITY_COLUMNS)
    by_patient: dict[str, list] = {}
    for row in table.to_pylist():
      if row['patient_id'] in kept:
        by_patient.setdefault(row['patient_id'], []).append(row)
    for pid, rows in sorted(by_patient.items()):
      yield pid, packing.pack(rows)


class _IdentitiesFn(beam.DoFn):
  """A kept patient and its old rows -> one identity record, as the decode
  stage emits for a chunk (``transforms.duplicates``)."""

  def __init__(
    self,
    input_root: str,
    fractions: tuple,
    config: stores.StoreConfig,
    max_file_bytes: int | None,
  ):
    self._input_root = input_root
    self._fractions = fractions
    self._config = config
    self._max_file_bytes = max_file_bytes

  def setup(self):
    stores.configure(self._config)

  def process(self, element) -> Iterator[tuple]:
    _, grouped = element
    patients = list(grouped['kept'])
    if not patients:
      return
    patient = patients[0]
    split = patient.split(self._fractions)
    rows = [row for packed in grouped['old'] for row in packing.unpack(packed)]
    written = {row['slice_index'] for row in rows}
    slices = tuple(
      layout.slice_identity(
        {
          **row,
          'original_id': patient.original_id,
          'split': split,
        }
      )
      for row in sorted(rows, key=lambda r: r['slice_index'])
    )
    contours = []
    for contour in patient.contours:
      if contour.slice_index not in written:
        continue
      data = files.read_or_fail(
        self._input_root, contour.read_path, self._max_file_bytes
      )
      if not isinstance(data, Failed):
        contours.append(
          (
            patient.patient_id,
            patient.original_id,
            contour.slice_index,
            contour.kind,
            contour.path,
            xxhash.xxh3_64_hexdigest(data),
          )
        )
    if slices or contours:
      yield slices, tuple(contours)


class KeptIdentities(beam.PTransform):
  """Kept Patients -> identity records of their written slices (read from
  ``old_files``, the start version's slice files) and contour files."""

  def __init__(
    self,
    old_files: tuple[str, ...],
    input_root: str,
    fractions: tuple[float, float, float],
    config: stores.StoreConfig | None = None,
    max_file_bytes: int | None = None,
  ):
    """``max_file_bytes``: the largest contour file read, as in the decode
    stage (a larger one has no identity there either)."""
    super().__init__()
    self._old_files = old_files
    self._input_root = input_root
    self._fractions = fractions
    self._config = config or stores.StoreConfig()
    self._max_file_bytes = max_file_bytes

  def expand(self, kept):
    ids = kept | 'KeptIds' >> beam.Map(lambda p: p.patient_id).with_output_types(str)
    old = (
      kept.pipeline
      | 'OldFiles' >> beam.Create(self._old_files).with_output_types(str)
      | 'SpreadFiles' >> beam.Reshuffle()
      | 'OldRows' >> beam.ParDo(_OldRowsFn(self._config), beam.pvalue.AsList(ids))
    )
    return (
      {
        'kept': kept
        | 'KeptById'
        >> beam.Map(lambda p: (p.patient_id, p)).with_output_types(tuple[str, Patient]),
        'old': old,
      }
      | 'JoinOldRows' >> beam.CoGroupByKey()
      | 'Identities'
      >> beam.ParDo(
        _IdentitiesFn(
          self._input_root, self._fractions, self._config, self._max_file_bytes
        )
      )
    )
