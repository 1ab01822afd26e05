"""Looking at the data: overlays, inspect, QA sheets in Chromium, verify."""

import json
import os
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_pipeline import inspect, qa, render, verify
from beam_pipeline.contract import schema as s
from beam_pipeline.dataset import mask_of
from tests.conftest import WRITTEN_COLUMNS, WRITTEN_ROWS


def _labeled(manifest):
  return next(e for e in manifest.slices.values() if e.i_vertices and e.o_vertices)


def _edge(mask):
  """Mask pixels with a 4-neighbour outside the mask: written apart from render."""
  edge = np.zeros_like(mask)
  for r, c in zip(*np.nonzero(mask), strict=True):
    neighbours = [(r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)]
    edge[r, c] = any(
      not (0 <= y < mask.shape[0] and 0 <= x < mask.shape[1]) or not mask[y, x]
      for y, x in neighbours
    )
  return edge


def test_inspect_draws_contours_on_the_mask_edges(written, tmp_path):
  out, _, manifest = written
  e = _labeled(manifest)
  png = str(tmp_path / 'slice.png')
  assert (
    inspect.main(
      [
        out,
        '--patient',
        e.patient_id,
        '--slice',
        str(e.slice_index),
        '-o',
        png,
        '--scale',
        '2',
      ]
    )
    == 0
  )
  picture = np.asarray(Image.open(png).convert('RGB'))
  assert (
    picture.shape[0] > 2 * WRITTEN_ROWS and picture.shape[1] == 2 * WRITTEN_COLUMNS
  )  # + legend
  drawn = picture[: 2 * WRITTEN_ROWS : 2, ::2]  # one pixel per image pixel
  row = inspect.find_slice(out, e.patient_id, e.slice_index)
  inner, outer = _edge(mask_of(row, 'i')), _edge(mask_of(row, 'o'))
  assert inner.any() and outer.any()
  assert (drawn[inner] == render.INNER_COLOUR).all()
  assert (drawn[outer & ~inner] == render.OUTER_COLOUR).all()
  elsewhere = drawn[~(inner | outer)]
  assert (elsewhere[:, 0] == elsewhere[:, 1]).all() and (
    elsewhere[:, 1] == elsewhere[:, 2]
  ).all()


def test_inspect_reports_a_missing_slice(written, tmp_path, capsys):
  out, _, _ = written
  code = inspect.main(
    [out, '--patient', 'NOPE', '--slice', '1', '-o', str(tmp_path / 'x.png')]
  )
  assert code == 2 and 'no slice 1' in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'x.png')


def test_qa_dir_has_a_sheet_per_labeled_patient_and_an_index(written):
  _, qa_dir, manifest = written
  patients = sorted({e.patient_id for e in manifest.slices.values()})
  assert sorted(os.listdir(qa_dir)) == sorted(
    [f'{p}.png' for p in patients] + [qa.INDEX]
  )
  index = open(os.path.join(qa_dir, qa.INDEX)).read()
  for pid in patients:
    assert f'src="{pid}.png"' in index
  sheet = np.asarray(
    Image.open(os.path.join(qa_dir, f'{patients[0]}.png')).convert('RGB')
  )
  assert (sheet == render.INNER_COLOUR).all(axis=2).any()
  assert (sheet == render.OUTER_COLOUR).all(axis=2).any()


def _chromium():
  found = shutil.which('chromium') or shutil.which('chromium-browser')
  if found is None:
    if os.environ.get('CI'):
      pytest.fail('Chromium is not installed; .ci/run installs it')
    pytest.skip('Chromium is not installed (apt-get install chromium)')
  return found


def test_index_html_renders_in_headless_chromium(written, tmp_path):
  _, qa_dir, _ = written
  shot = tmp_path / 'index.png'
  subprocess.run(
    [
      _chromium(),
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      f'--user-data-dir={tmp_path / "profile"}',
      '--window-size=1000,1400',
      f'--screenshot={shot}',
      f'file://{os.path.join(qa_dir, qa.INDEX)}',
    ],
    check=True,
    capture_output=True,
    timeout=120,
  )
  pixels = np.asarray(Image.open(shot).convert('RGB')).astype(int)

  # The page shows the sheets: the overlay colours are on screen (allowing
  # for scaling), and so is dark table text on the white page.
  def near(colour):
    return (np.abs(pixels - colour).sum(axis=2) < 60).sum()

  assert near(render.INNER_COLOUR) > 20 and near(render.OUTER_COLOUR) > 20
  assert near((0, 0, 0)) > 500 and near((255, 255, 255)) > 100_000


def _copy(out, tmp_path):
  copy = str(tmp_path / 'copy')
  shutil.copytree(out, copy)
  return copy


def test_verify_passes_on_a_fresh_output(written, capsys):
  out, _, _ = written
  assert verify.main([out]) == 0
  assert 'checks passed' in capsys.readouterr().out


def test_verify_catches_a_duplicated_shard(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  folder = os.path.join(copy, s.SLICES_DIR)
  name = sorted(os.listdir(folder))[0]
  shutil.copy(os.path.join(folder, name), os.path.join(folder, 'extra-' + name))
  failures = verify.verify(copy).failures
  assert (
    'no duplicate (patient_id, slice_index)' in failures and 'slice rows' in failures
  )


def test_verify_catches_a_corrupted_image(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  folder = os.path.join(copy, s.SLICES_DIR)
  path = os.path.join(folder, sorted(os.listdir(folder))[0])
  table = pq.read_table(path)
  images = table['image'].to_pylist()
  images[0] = bytes([images[0][0] ^ 1]) + images[0][1:]
  table = table.set_column(
    table.schema.get_field_index('image'), s.SLICE_SCHEMA.field('image'), [images]
  )
  pq.write_table(table, path)
  assert verify.verify(copy).failures == ['images and masks decode']


def test_verify_catches_missing_summary_and_lost_reports(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  with open(os.path.join(copy, s.SUMMARY_FILE)) as f:
    summary = json.load(f)
  summary['counters']['slices_written'] += 1
  with open(os.path.join(copy, s.SUMMARY_FILE), 'w') as f:
    json.dump(summary, f)
  assert verify.verify(copy).failures == ['slice rows']
  shutil.rmtree(os.path.join(copy, s.RECONCILIATION_DIR))
  os.makedirs(os.path.join(copy, s.RECONCILIATION_DIR))
  os.remove(os.path.join(copy, s.SUMMARY_FILE))
  failures = verify.verify(copy).failures
  assert 'run completed' in failures and 'every written patient is matched' in failures
  assert verify.main([str(tmp_path / 'nothing')]) == 2
