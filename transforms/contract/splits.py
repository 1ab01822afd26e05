"""Train/val/test assignment: a stable hash of patient_id, filled for small
cohorts, pinned by the dataset's history.

Every slice of a patient lands in the same split. The rule (``assign``):

1. A patient already in the version the run starts from (same input, same
   fractions) keeps the split it had there: adding or removing patients
   never moves an existing one.
2. Every other patient takes the split its hash position falls in
   (``patient_position``: SHA-256 of the patient_id as written in link.csv,
   a uniform number in [0, 1), against the cumulative fractions).
3. Then, for each split with a non-zero fraction that holds no patient
   (train, val, test in turn), the new patient nearest to that split's
   interval of positions moves into it, taken from a split that keeps at
   least one patient. So with at least as many patients as non-zero
   fractions, every such split gets one. The choice depends only on the
   positions, so re-runs, runners and machines agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from transforms.contract.errors import UsageError

SPLITS = ('train', 'val', 'test')
# Names the rule below: part of the settings an incremental run compares,
# so a change of rule makes the next run a full one (which pins the
# dataset's patients all the same).
RULE = 'hash+fill'
DEFAULT_FRACTIONS = '0.8,0.1,0.1'


def parse_fractions(text: str) -> tuple[float, float, float]:
  """Parses ``--split`` ("train,val,test" fractions that sum to 1).

  Raises:
    UsageError: not three non-negative numbers summing to 1.
  """
  try:
    fractions = tuple(float(part) for part in text.split(','))
  except ValueError as e:
    raise UsageError(f'--split {text!r}: not numbers') from e
  if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions):
    raise UsageError(f'--split {text!r}: expected three non-negative fractions')
  if abs(sum(fractions) - 1) > 1e-6:
    raise UsageError(f'--split {text!r}: fractions sum to {sum(fractions)}, not 1')
  return fractions


def patient_position(patient_id: str) -> float:
  """A uniform number in [0, 1) fixed by the patient_id (SHA-256 based)."""
  digest = hashlib.sha256(patient_id.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def assign_split(patient_id: str, fractions: tuple[float, float, float]) -> str:
  """The split of a patient: train if position < f_train, then val, then test."""
  return split_at(patient_position(patient_id), fractions)


def patient_split(
  patient_id: str, position: float | None, fractions: tuple[float, float, float]
) -> str:
  """A patient's split: at its ``position`` if the link fixed one (under
  pseudonyms, from the id as written), else from ``patient_id``."""
  if position is None:
    return assign_split(patient_id, fractions)
  return split_at(position, fractions)


def split_at(position: float, fractions: tuple[float, float, float]) -> str:
  """The split of a patient at ``position`` (see :func:`patient_position`)."""
  edge = 0.0
  for name, fraction in zip(SPLITS, fractions, strict=True):
    edge += fraction
    if position < edge:
      return name
  return SPLITS[-1]


def _interval(name: str, fractions: tuple[float, float, float]) -> tuple[float, float]:
  """The positions [low, high) whose hash split is ``name``."""
  k = SPLITS.index(name)
  return sum(fractions[:k]), sum(fractions[: k + 1])


def _distance(position: float, interval: tuple[float, float]) -> float:
  low, high = interval
  return max(low - position, position - high, 0.0)


def assign(
  positions: Mapping[str, float],
  fractions: tuple[float, float, float],
  pinned: Mapping[str, str] | None = None,
) -> dict[str, str]:
  """Every patient's split by the module's rule.

  Args:
    positions: {patient_id: its position} (``patient_position``, or the
      link's own position under pseudonyms).
    fractions: the train, val and test fractions.
    pinned: {patient_id: split} of the patients that keep their split.
  """
  pinned = pinned or {}
  split_of = {
    pid: pinned[pid] if pid in pinned else split_at(position, fractions)
    for pid, position in positions.items()
  }
  movable = {pid for pid in positions if pid not in pinned}
  for name, fraction in zip(SPLITS, fractions, strict=True):
    sizes = {s: 0 for s in SPLITS}
    for split in split_of.values():
      sizes[split] += 1
    if fraction == 0 or sizes[name]:
      continue
    interval = _interval(name, fractions)
    candidates = [pid for pid in movable if sizes[split_of[pid]] > 1]
    if not candidates:
      continue
    pick = min(candidates, key=lambda pid: (_distance(positions[pid], interval), pid))
    split_of[pick] = name
    movable.discard(pick)
  return split_of
