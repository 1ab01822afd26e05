"""The stages' settings and their defaults, in one light module.

The command line (``beam_pipeline.launch.options``) reads the defaults from here
without importing Beam, pydicom or pyarrow, so ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple

from transforms.contract import splits
from transforms.io.dicomweb import DicomWebConfig
from transforms.io.protocol import StoreConfig

if TYPE_CHECKING:  # pseudonyms imports pyarrow (through the schema): not for --help
  from transforms.contract.pseudonyms import Pseudonyms

DEFAULT_CHUNK_SIZE = 64
DEFAULT_MAX_PIXELS = 4096 * 4096
# The largest file read (or deflated data set inflated): a 4096 x 4096 slice
# of 64-bit samples is 128 MiB, so twice that leaves room for any header.
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
# Decoded image bytes per Arrow table (one row group). Writing a table costs
# about twice its size again in Parquet's page buffers when single images are
# large, so this bound keeps a worker's memory flat whatever the images
# (bench/memory.py, BENCHMARKS.md); chunks of 256 x 256 slices never reach it.
DEFAULT_MAX_CHUNK_BYTES = 64 * 1024 * 1024
DEFAULT_DECODE_TIMEOUT = 120.0
DEFAULT_DECODERS = 1
DEFAULT_PROGRESS_SECONDS = 5.0
IMAGE_CODECS = ('none', 'lz4', 'snappy', 'zstd', 'gzip', 'brotli')
# The levels Arrow accepts for the codecs that take one (pyarrow.Codec).
CODEC_LEVELS = {'zstd': (1, 22), 'gzip': (1, 9), 'brotli': (0, 11)}
# zstd at level 2: the image column smaller than at level 1 (the baseline
# script's), so the dataset is no larger than that script's output; raw bytes
# (``none``) read back faster (BENCHMARKS.md, bench/codecs.py).
DEFAULT_IMAGE_CODEC = 'zstd:2'


def parse_image_codec(spec: str) -> tuple[str, int | None]:
  """('zstd', 2) for 'zstd:2', ('none', None) for 'none'.

  Raises:
    ValueError: an unknown codec, or a level it does not take.
  """
  name, colon, level = spec.partition(':')
  if name not in IMAGE_CODECS:
    raise ValueError(f'unknown codec {name!r} (choose from {", ".join(IMAGE_CODECS)})')
  if not colon:
    return name, None
  if name not in CODEC_LEVELS:
    raise ValueError(f'{name} takes no level')
  low, high = CODEC_LEVELS[name]
  if not level.isdigit() or not low <= int(level) <= high:
    raise ValueError(f'{name} takes a level from {low} to {high}, not {level!r}')
  return name, int(level)


class Limits(NamedTuple):
  """What one input file may cost, checked before it is read whole,
  inflated or decoded."""

  max_pixels: int = DEFAULT_MAX_PIXELS
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How the decode stage works; pickled to every worker with its DoFns.

  Attributes:
    chunk_size: slices per work item and (at most) per Parquet row group.
    max_chunk_bytes: decoded image bytes per Arrow table: a chunk whose
      images hold more is written as several row groups.
    labeled_only: keep only slices with at least one contour file.
    exclude_burned_in: leave out slices whose header says the pixels may
      show text (an error row each, stage excluded).
    max_pixels: the largest rows x columns x samples accepted, checked from
      the header before any pixel buffer is allocated.
    max_file_bytes: the largest file read, and the largest size a deflated
      data set may inflate to; checked before reading or inflating.
    split_fractions: train/val/test fractions for the split column.
    isolate: decode what the native reader declines in a child process, so a
      decoder crash or hang costs one slice, not the worker.
    decode_timeout: seconds one file may take to decode when isolated.
    decoders: decoder children per worker (isolated only).
    progress_seconds: at most one progress line per worker this often.
    progress_dir: a local folder where each worker process keeps its counts
      for the launcher's progress line (None: workers log their own lines).
    store: how to reach object stores, and how many reads to keep in flight.
    dicomweb: the PACS the slices come from (None: the tree's dicoms/).
    pseudonyms: the UIDs written are these pseudonyms (None: as stored);
      the chunks' ids and paths already are.
  """

  chunk_size: int = DEFAULT_CHUNK_SIZE
  labeled_only: bool = False
  exclude_burned_in: bool = False
  max_pixels: int = DEFAULT_MAX_PIXELS
  max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
  max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
  split_fractions: tuple[float, float, float] = splits.parse_fractions(
    splits.DEFAULT_FRACTIONS
  )
  isolate: bool = True
  decode_timeout: float = DEFAULT_DECODE_TIMEOUT
  decoders: int = DEFAULT_DECODERS
  progress_seconds: float = DEFAULT_PROGRESS_SECONDS
  progress_dir: str | None = None
  store: StoreConfig = StoreConfig()
  dicomweb: DicomWebConfig | None = None
  pseudonyms: Pseudonyms | None = None

  @property
  def limits(self) -> Limits:
    """The per-file limits."""
    return Limits(self.max_pixels, self.max_file_bytes)
