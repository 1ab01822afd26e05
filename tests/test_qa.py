"""Looking at the data: overlays, inspect, QA sheets in Chromium, verify."""

import html
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_pipeline.dataset import mask_of
from beam_pipeline.launch import cli
from beam_pipeline.tools import overlay, qa, render, sample, verify
from tests.conftest import WRITTEN_COLUMNS, WRITTEN_ROWS
from tests.helpers import add_to_commit, commit_file, rewrite_record
from transforms.contract import schema


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
    overlay.main(
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
  row = overlay.find_slice(out, e.patient_id, e.slice_index)
  inner, outer = _edge(mask_of(row, 'i')), _edge(mask_of(row, 'o'))
  assert inner.any() and outer.any()
  assert (drawn[inner] == render.INNER_COLOUR).all()
  assert (drawn[outer & ~inner] == render.OUTER_COLOUR).all()
  elsewhere = drawn[~(inner | outer)]
  assert (elsewhere[:, 0] == elsewhere[:, 1]).all() and (
    elsewhere[:, 1] == elsewhere[:, 2]
  ).all()


def test_inspect_reports_a_missing_slice(written, tmp_path, capsys):
  out, _, manifest = written
  code = overlay.main(
    [out, '--patient', 'NOPE', '--slice', '1', '-o', str(tmp_path / 'x.png')]
  )
  err = capsys.readouterr().err
  assert code == 2 and "no patient 'NOPE'" in err
  for e in manifest.slices.values():  # every valid id pair is listed
    assert f'{e.patient_id} ({e.original_id})' in err
  e = _labeled(manifest)
  code = overlay.main(
    [out, '--patient', e.original_id, '--slice', '99', '-o', str(tmp_path / 'x.png')]
  )
  err = capsys.readouterr().err
  slices = sorted(k for p, k in manifest.slices if p == e.patient_id)
  assert code == 2 and 'has no slice 99' in err
  assert err.rstrip().endswith(f'its slices: {slices[0]}-{slices[-1]}'), err
  assert not os.path.exists(tmp_path / 'x.png')


def test_qa_dir_has_a_sheet_per_labeled_patient_and_an_index(written):
  _, qa_dir, manifest = written
  patients = sorted({e.patient_id for e in manifest.slices.values()})
  assert sorted(os.listdir(qa_dir)) == sorted(
    [f'{p}.png' for p in patients] + [qa.INDEX, qa.OVERLAYS]
  )
  index = open(os.path.join(qa_dir, qa.INDEX)).read()
  for pid in patients:
    assert f'href="{pid}.png"' in index
  for e in manifest.slices.values():
    overlay = os.path.join(qa_dir, qa.overlay_path(e.patient_id, e.slice_index))
    assert os.path.exists(overlay) == e.labeled
    if e.labeled:
      assert f'src="{qa.overlay_path(e.patient_id, e.slice_index)}"' in index
      width, height = Image.open(overlay).size
      factor = -(-256 // min(WRITTEN_ROWS, WRITTEN_COLUMNS))
      assert (width, height) == (WRITTEN_COLUMNS * factor, WRITTEN_ROWS * factor)
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


def _chromium_args(tmp_path):
  return [
    _chromium(),
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--force-device-scale-factor=1',
    f'--user-data-dir={tmp_path / "profile"}',
    '--window-size=1000,1400',
  ]


def test_index_html_renders_in_headless_chromium(written, tmp_path):
  _, qa_dir, _ = written
  shot = tmp_path / 'index.png'
  subprocess.run(
    [
      *_chromium_args(tmp_path),
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


_PROBE = """
<script>
window.addEventListener('load', async () => {
  const px = (el) => parseFloat(getComputedStyle(el).fontSize);
  const box = (el) => el.getBoundingClientRect();
  const legend = document.getElementById('legend');
  const figures = [...document.querySelectorAll('figure')].map((f) => {
    const caption = f.querySelector('figcaption');
    return {
      flags: f.dataset.flags ? f.dataset.flags.split(' ') : [],
      caption: caption.innerText,
      fonts: [caption, ...f.querySelectorAll('.flag')].map(px),
      overflow: caption.scrollWidth > caption.clientWidth + 1,
      hidden: [...f.querySelectorAll('.flag')].some((s) => box(s).width === 0),
      inside: box(caption).right <= box(f).right + 1,
      href: f.querySelector('a').getAttribute('href'),
    };
  });
  const links = [...document.querySelectorAll('#flagged a')];
  const loaded = await Promise.all(links.map((a) => new Promise((done) => {
    const img = new Image();
    img.onload = () => done([a.getAttribute('href'), img.naturalWidth]);
    img.onerror = () => done([a.getAttribute('href'), 0]);
    img.src = a.href;
  })));
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({
    legendFonts: [...legend.querySelectorAll('p, td, th')].map(px),
    swatches: [...legend.querySelectorAll('.swatch')].map((s) => [
      box(s).width, getComputedStyle(s).backgroundColor]),
    figures,
    loaded,
  });
  document.body.appendChild(probe);
});
</script>
"""


def _bow_tie(columns, rows):
  """A self-intersecting contour with a vertex outside the image."""
  return [(2, 2), (columns - 3, rows - 3), (columns - 3, 2), (2, rows + 5)]


@pytest.fixture(scope='module')
def flagged_qa(tmp_path_factory):
  """A run whose QA page has flagged slices: two contours made to raise
  several flags each (self-intersecting, a vertex outside the image)."""
  base = tmp_path_factory.mktemp('flagged')
  root, out, qa_dir = base / 'DATA', base / 'OUT', base / 'QA'
  manifest = sample.make_tree(str(root), patients=2, slices=6, rows=40, columns=32)
  spoiled = sorted(k for k, e in manifest.slices.items() if e.i_vertices)[:2]
  for n, (pid, k) in enumerate(spoiled):  # n: no two files alike (not copies)
    e = manifest.slices[(pid, k)]
    path = root / 'contourfiles' / e.original_id / 'i-contours'
    lines = ''.join(f'{x + n} {y}\n' for x, y in _bow_tie(32, 40))
    (path / f'IM-0001-{k:04d}-icontour-manual.txt').write_text(lines)
  args = ['--input', str(root), '--output', str(out), '--qa-dir', str(qa_dir)]
  assert cli.main(args) == cli.EXIT_OK
  return str(out), str(qa_dir), spoiled


def test_the_qa_page_names_flags_links_overlays_and_has_a_readable_legend(
  flagged_qa, tmp_path
):
  """In headless Chromium at 100 % zoom: every flagged tile's caption names
  each of its flags, inside the tile; each flagged-slice row links to a
  full-size overlay that loads; the legend's text is at least 14 px and its
  colour swatches are the outline colours."""
  out, qa_dir, spoiled = flagged_qa
  table = pq.read_table(
    os.path.join(out, schema.SLICES_DIR),
    columns=['patient_id', 'slice_index', 'qa_flags'],
  ).to_pylist()
  flagged = {
    (r['patient_id'], r['slice_index']): r['qa_flags'] for r in table if r['qa_flags']
  }
  assert set(spoiled) <= set(flagged)
  assert all(len(f) >= 2 for key, f in flagged.items() if key in spoiled)
  page = open(os.path.join(qa_dir, qa.INDEX), encoding='utf-8').read()
  probe_page = os.path.join(qa_dir, 'probe.html')
  with open(probe_page, 'w', encoding='utf-8') as f:
    f.write(page.replace('</body>', _PROBE + '</body>'))
  done = subprocess.run(
    [
      *_chromium_args(tmp_path),
      '--virtual-time-budget=10000',
      '--dump-dom',
      f'file://{probe_page}',
    ],
    check=True,
    capture_output=True,
    text=True,
    timeout=120,
  )
  found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
  assert found, done.stdout[-2000:]
  probe = json.loads(html.unescape(found.group(1)))
  assert probe['legendFonts'] and min(probe['legendFonts']) >= 14
  swatches = {colour for width, colour in probe['swatches'] if width >= 14}
  assert swatches == {
    'rgb({}, {}, {})'.format(*render.INNER_COLOUR),
    'rgb({}, {}, {})'.format(*render.OUTER_COLOUR),
  }
  tiles = {fig['href']: fig for fig in probe['figures']}
  for (pid, k), flags in flagged.items():
    fig = tiles[qa.overlay_path(pid, k)]
    assert sorted(fig['flags']) == sorted(flags)
    for flag in flags:
      assert flag in fig['caption'], fig
    assert min(fig['fonts']) >= 12 and not fig['overflow'] and not fig['hidden']
    assert fig['inside'], fig
  loaded = dict(probe['loaded'])
  assert sorted(loaded) == sorted(qa.overlay_path(p, k) for p, k in flagged)
  for (pid, k), _ in flagged.items():
    width = loaded[qa.overlay_path(pid, k)]
    assert width >= 256 and width % 32 == 0  # full size: whole-factor upscale


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
  folder = os.path.join(copy, schema.SLICES_DIR)
  name = sorted(n for n in os.listdir(folder) if n.endswith('.parquet'))[0]
  add_to_commit(copy, os.path.join(folder, name), os.path.join(folder, 'x-' + name))
  failures = verify.verify(copy).failures
  assert 'files match the summary' in failures
  assert (
    'no duplicate (patient_id, slice_index)' in failures and 'slice rows' in failures
  )


def test_verify_catches_a_corrupted_image(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  folder = os.path.join(copy, schema.SLICES_DIR)
  name = sorted(n for n in os.listdir(folder) if n.endswith('.parquet'))[0]
  path = os.path.join(folder, name)
  table = pq.read_table(path)
  images = table['image'].to_pylist()
  images[0] = bytes([images[0][0] ^ 1]) + images[0][1:]
  table = table.set_column(
    table.schema.get_field_index('image'), schema.SLICE_SCHEMA.field('image'), [images]
  )
  pq.write_table(table, path)
  assert verify.verify(copy).failures == [
    'files match the summary',
    'images and masks decode',
  ]


def test_verify_catches_missing_summary_and_lost_reports(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  commit = commit_file(copy)
  rewrite_record(commit, lambda r: r['counters'].update(slices_written=0))
  checks = verify.verify(copy)
  assert checks.failures == ['run completed']
  assert 'was altered' in checks.lines[0]
  shutil.rmtree(os.path.join(copy, schema.RECONCILIATION_DIR))
  os.makedirs(os.path.join(copy, schema.RECONCILIATION_DIR))
  os.remove(commit)
  failures = verify.verify(copy).failures
  assert 'run completed' in failures and 'every written patient is matched' in failures
  assert verify.main([str(tmp_path / 'nothing')]) == 2
