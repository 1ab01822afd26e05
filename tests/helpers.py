"""Helpers shared by the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import socket

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow.parquet as pq
from pydicom.data import get_testdata_file

from beam_pipeline import sample

_SORT_KEYS = {
  'slices': ('patient_id', 'slice_index'),
  'reconciliation': ('patient_id', 'original_id', 'status', 'detail'),
  'errors': ('path', 'stage', 'error'),
}


def dataset_tables(out):
  """The three tables of a local pipeline output, each in a canonical row order."""
  return {
    name: sorted(
      pq.read_table(os.path.join(out, name)).to_pylist(),
      key=lambda r, keys=keys: tuple(str(r[k]) for k in keys),
    )
    for name, keys in _SORT_KEYS.items()
  }


def set_tags(ds, **tags):
  """``ds`` with each keyword set to its value (None deletes it)."""
  for keyword, value in tags.items():
    if value is None:
      delattr(ds, keyword)
    else:
      setattr(ds, keyword, value)
  return ds


def free_port() -> int:
  """A TCP port nothing listens on, on 127.0.0.1."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def reference_mask(vertices, rows, columns):
  """The reference rasteriser, written exactly as users of this data know it."""
  img = PIL.Image.new('L', (columns, rows), 0)
  PIL.ImageDraw.Draw(img).polygon(vertices, outline=0, fill=1)
  return np.array(img).astype(bool)


def fuzz_seeds(folder) -> list[bytes]:
  """Files to mutate: a generated slice (written into ``folder``) and
  pydicom's test files in several transfer syntaxes."""
  path = os.path.join(folder, 'seed.dcm')
  sample.write_dicom(path, sample.expected_image('F', 1, 24, 24), 'F', 1)
  names = [
    'MR_small.dcm',
    'MR_small_RLE.dcm',
    'MR_small_jp2klossless.dcm',
    'MR_small_jpeg_ls_lossless.dcm',
    'MR_small_bigendian.dcm',
    'SC_rgb_jpeg_dcmtk.dcm',
  ]
  seeds = [open(path, 'rb').read()]
  seeds += [open(get_testdata_file(name), 'rb').read() for name in names]
  return seeds


def mutate(rng: np.random.Generator, seeds: list[bytes]) -> bytes:
  """One mutation: truncate, flip bytes, splice two files, or insert noise."""
  data = bytearray(seeds[int(rng.integers(len(seeds)))])
  kind = int(rng.integers(4))
  if kind == 0:
    return bytes(data[: int(rng.integers(len(data)))])
  if kind == 1:
    for _ in range(int(rng.integers(1, 16))):
      at = int(rng.integers(len(data)))
      data[at] ^= 1 << int(rng.integers(8))
    return bytes(data)
  if kind == 2:
    other = seeds[int(rng.integers(len(seeds)))]
    return bytes(
      data[: int(rng.integers(len(data)))] + other[int(rng.integers(len(other))) :]
    )
  at = int(rng.integers(len(data)))
  noise = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
  return bytes(data[:at] + noise + data[at:])
