"""Train/val/test assignment by a stable hash of patient_id.

Every slice of a patient lands in the same split, and the assignment depends
only on the patient_id and the fractions: re-runs, other runners and other
machines give the same answer.
"""

from __future__ import annotations

import hashlib

from transforms.contract.errors import UsageError

SPLITS = ('train', 'val', 'test')
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
