"""Shared test helpers: the reference rasteriser and generated trees."""

import os
import socket

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow.parquet as pq
import pytest

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


@pytest.fixture
def tree(tmp_path):
  """A generated tree with every quirk: (root, manifest)."""
  root = str(tmp_path / 'DATA')
  manifest = sample.make_tree(
    root, patients=2, slices=12, rows=48, columns=40, quirks=['all']
  )
  return root, manifest


@pytest.fixture
def clean_tree(tmp_path):
  """A generated tree without quirks: (root, manifest)."""
  root = str(tmp_path / 'CLEAN')
  manifest = sample.make_tree(root, patients=3, slices=10, rows=32, columns=36)
  return root, manifest
