"""What reading and decoding one input can end in: Decoded or Failed.

Decoders, decoder children and file reads return one of these, never raise
for a bad input, so a stage can route each outcome with ``isinstance``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Decoded(NamedTuple):
  """A decoded slice.

  Attributes:
    meta: the metadata columns (``columns.METADATA_NAMES``), typed as in
      SLICE_SCHEMA.
    image: pixel_array, unscaled, C-contiguous, little-endian.
    size: bytes of the file it came from.
    burned_in: why its pixels may show burned-in text
      (``flags.burned_in_risk``), or None.
  """

  meta: dict
  image: np.ndarray
  size: int
  burned_in: str | None = None


class Failed(NamedTuple):
  """An input that cannot be used: the errors-table stage and message."""

  stage: str  # schema.STAGE_READ, STAGE_DECODE, ...
  message: str


Outcome = Decoded | Failed
