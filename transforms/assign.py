"""The split of every matched patient, decided once for the whole cohort.

A patient's split cannot be decided alone: a small cohort needs every
non-zero split filled, and a patient already in the dataset keeps the split
it had (``transforms.contract.splits``, whose ``assign`` is the rule). So
the patients' positions are gathered into one map, the rule runs once over
it, and every patient carries its split (``Patient.assigned``) to the
stages after it.
"""

from __future__ import annotations

import json

import apache_beam as beam

from transforms.contract import splits
from transforms.contract.layout import Patient
from transforms.io import stores

# Written by the launcher into the staging folder: {"pinned": {patient_id:
# split}, "hashed": [patient_id, ...]}: the start version's patients, with
# the split each keeps ("hashed": versions made before the rule recorded
# splits, whose patients keep their hash split).
PINNED_FILE = '_PINNED_SPLITS.json'


class _RuleFn(beam.DoFn):
  """{patient_id: position} -> {patient_id: split} (one element)."""

  def __init__(
    self,
    fractions: tuple[float, float, float],
    pinned: str | None,
    config: stores.StoreConfig,
  ):
    self._fractions = fractions
    self._pinned = pinned
    self._config = config

  def setup(self):
    stores.configure(self._config)

  def process(self, positions: dict[str, float]):
    found = {} if self._pinned is None else json.loads(stores.read_bytes(self._pinned))
    pinned = dict(found.get('pinned', {}))
    for pid in found.get('hashed', ()):
      if pid in positions:
        pinned[pid] = splits.split_at(positions[pid], self._fractions)
    # a pinned patient outside the fill (no contours under --labeled-only)
    # still keeps its split
    yield {**pinned, **splits.assign(positions, self._fractions, pinned)}


class AssignSplits(beam.PTransform):
  """Patients -> the same patients, each with its split assigned.

  Args:
    fractions: the --split fractions.
    pinned: a PINNED_FILE, or None when no patient keeps a split.
    config: the store settings (the file may be in an object store).
    labeled_only: patients without contour files then write no slice: they
      fill no empty split (they keep a pinned split, else their hash one).
  """

  def __init__(
    self,
    fractions: tuple[float, float, float],
    pinned: str | None,
    config: stores.StoreConfig | None = None,
    labeled_only: bool = False,
  ):
    super().__init__()
    self._labeled_only = labeled_only
    self._fractions = fractions
    self._pinned = pinned
    self._config = config or stores.StoreConfig()

  def expand(self, patients):
    labeled_only = self._labeled_only
    rule = (
      patients
      | 'Counted' >> beam.Filter(lambda p: not labeled_only or bool(p.contours))
      | 'Positions' >> beam.Map(lambda p: (p.patient_id, p.split_position()))
      | 'AllPositions' >> beam.combiners.ToDict()
      | 'Rule' >> beam.ParDo(_RuleFn(self._fractions, self._pinned, self._config))
    )
    return patients | 'Assign' >> beam.Map(
      _assigned, beam.pvalue.AsSingleton(rule)
    ).with_output_types(Patient)


def _assigned(patient: Patient, split_of: dict[str, str]) -> Patient:
  if patient.patient_id not in split_of:
    return patient
  return patient._replace(assigned=split_of[patient.patient_id])
