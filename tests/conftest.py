"""Shared test helpers: the reference rasteriser and generated trees."""

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from beam_pipeline import sample


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
