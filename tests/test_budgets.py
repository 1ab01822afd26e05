"""Work without a bound: every reader of input bytes obeys a budget.

Each hostile input of issue 35 (defect 5) is built here and given to the real
entry point in a subprocess, whose peak RSS (the largest of its descendants,
``RUSAGE_CHILDREN``) and wall time are measured: a contour of 600,000 or
3,000,000 random vertices, a deflated slice that inflates to 2 GiB, a
link.csv of 500,000 repeated rows. Each is its one row (or one counted row),
never an OOM. The pure pieces (the contour parser and its cost model, the
launcher's header read, the link reader) are tested on their own too.
"""

import logging
import os
import subprocess
import sys
import time
import tracemalloc
from typing import NamedTuple

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from beam_pipeline.dataset import open_dataset, read_errors, read_reconciliation
from beam_pipeline.launch import cli, preflight
from beam_pipeline.tools import sample
from tests.helpers import random_contour, reference_mask, write_deflate_bomb
from transforms.contract import layout, schema
from transforms.contract.errors import ContourError
from transforms.contract.pseudonyms import Pseudonyms
from transforms.decode import masks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS, COLUMNS = 64, 48
# The bound asserted on a run's peak RSS: a run of a small tree takes about
# 300 MB here, the old code took 1.2 GB (3,000,000 vertices) and 4 GB (the
# 2 GiB deflate bomb).
PEAK_BOUND = 600 << 20
SECONDS_BOUND = 120  # minutes (600,000 vertices) or more than 400 s before

# Runs argv, then prints the peak RSS of its process tree (KiB, Linux).
_MEASURE = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
sys.stderr.buffer.write(done.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(done.returncode)
"""


class Run(NamedTuple):
  code: int
  seconds: float
  peak: int  # bytes
  stderr: str


def _measured(tmp_path, root: str, out: str, *extra: str) -> Run:
  """The real entry point on ``root``, in a subprocess of a subprocess (so
  that nothing else this test process ran counts in the peak)."""
  command = [os.path.join(REPO, 'run_pipeline.py'), '--input', root, '--output', out]
  start = time.monotonic()
  done = subprocess.run(
    [sys.executable, '-c', _MEASURE, sys.executable, *command, *extra],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
  )
  seconds = time.monotonic() - start
  run = Run(done.returncode, seconds, int(done.stdout.split()[-1]) << 10, done.stderr)
  assert 'Traceback' not in run.stderr, run.stderr[-3000:]
  assert run.peak < PEAK_BOUND, f'peak RSS {run.peak >> 20} MiB'
  assert run.seconds < SECONDS_BOUND, f'{run.seconds:.0f} s'
  return run


def _tree(tmp_path, patients: int = 2, slices: int = 3):
  root = str(tmp_path / 'DATA')
  manifest = sample.make_tree(
    root, patients=patients, slices=slices, rows=ROWS, columns=COLUMNS, contour_every=1
  )
  return root, manifest


def _write(root: str, relative: str, data: bytes) -> None:
  path = os.path.join(root, *relative.split('/'))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _contour_path(original_id: str, kind: str, k: int) -> str:
  return f'contourfiles/{original_id}/{kind}-contours/{layout.contour_name(kind, k)}'


# Contours: a vertex limit, and a cost model of the fill and the crossing check.


def test_contours_of_600_000_and_3_000_000_random_vertices_are_one_row_each(tmp_path):
  root, manifest = _tree(tmp_path)
  (pid, oid), (other, _) = manifest.links[0], manifest.links[1]
  big = _contour_path(oid, 'i', 1)
  huge = _contour_path(oid, 'o', 2)
  _write(root, big, random_contour(600_000, ROWS, COLUMNS))  # 7 MB
  _write(root, huge, random_contour(3_000_000, ROWS, COLUMNS, seed=1))  # 35 MB
  out = str(tmp_path / 'OUT')
  run = _measured(tmp_path, root, out)
  assert run.code == cli.EXIT_DROPPED, run.stderr[-2000:]
  errors = {r['path']: r for r in read_errors(out).to_pylist()}
  assert sorted(errors) == sorted([big, huge])
  assert {r['stage'] for r in errors.values()} == {schema.STAGE_CONTOUR}
  assert 'more than the 200,000,000 a contour may take' in errors[big]['error']
  assert errors[huge]['error'].startswith('line 1000001: more than 1,000,000 vertices')
  columns = ['patient_id', 'slice_index', 'i_mask', 'o_mask']
  rows = open_dataset(out).to_table(columns=columns).to_pylist()
  assert len(rows) == 6  # every slice written, those two masks null
  masks_of = {(r['patient_id'], r['slice_index']): r for r in rows}
  assert masks_of[pid, 1]['i_mask'] is None and masks_of[pid, 2]['o_mask'] is None
  assert masks_of[other, 1]['i_mask'] is not None


def test_parsing_stops_at_the_vertex_after_the_limit(monkeypatch):
  monkeypatch.setattr(masks, 'MAX_VERTICES', 1000)
  at_limit = random_contour(1000, ROWS, COLUMNS)
  assert len(masks.parse_contour(at_limit)) == 1000
  # The limit is found on line 1001, whatever follows: a bad line after it
  # is never read.
  over = at_limit + b'1 2\n' + b'not a vertex\n' * 10
  with pytest.raises(ContourError, match='^line 1001: more than 1,000 vertices'):
    masks.parse_contour(over)
  monkeypatch.setattr(masks, '_SPLIT_BYTES', 0)  # the line-at-a-time path
  assert len(masks.parse_contour(at_limit)) == 1000
  with pytest.raises(ContourError, match='^line 1001: more than 1,000 vertices'):
    masks.parse_contour(over)


def test_three_million_vertices_stop_in_seconds():
  data = random_contour(3_000_000, ROWS, COLUMNS)
  start = time.monotonic()
  with pytest.raises(ContourError, match='^line 1000001: more than 1,000,000'):
    masks.parse_contour(data)
  assert time.monotonic() - start < 30  # about 3 s here; it used to take minutes


_TEXT = st.text(alphabet=st.sampled_from(list(' \t\x1f\n\r\x0b\x0c\x1c\x1d\x1e1a.')))


@given(_TEXT)
@settings(max_examples=400, deadline=None)
def test_lines_are_found_as_splitlines_finds_them(text):
  data = text.encode()
  expected = [
    (n, line.strip())
    for n, line in enumerate(text.splitlines(), start=1)
    if line.split()
  ]
  for split_bytes in (1 << 20, 0):  # both paths
    masks._SPLIT_BYTES, saved = split_bytes, masks._SPLIT_BYTES
    try:
      found = [(n, line.strip()) for n, line in masks._lines(data) if line.split()]
    finally:
      masks._SPLIT_BYTES = saved
    assert found == expected


def test_a_flood_of_blank_lines_costs_no_list_of_lines():
  flood = b'\n' * (32 << 20) + b' \t\r\n' * (8 << 20)  # 64 MiB, 40 million lines
  vertices = b'1 2\n30 4\n5 40\n'
  start = time.monotonic()
  assert masks.parse_contour(flood + vertices) == [(1, 2), (30, 4), (5, 40)]
  with pytest.raises(ContourError, match='^line 41943043: not a finite number'):
    masks.parse_contour(flood + b'1 2\n3 4\n1e999 1\n')
  assert time.monotonic() - start < 30  # a few seconds here


def _folded_ring(count: int) -> list[tuple[float, float]]:
  """A simple ring folded on itself: nearly parallel edges, each as tall as
  thousands of others, that Pillow sees as a line (vertices are truncated to
  integers): cheap to fill, quadratic to check (GEOS compares edges whose
  bounding boxes meet)."""
  step = 9.0 / count
  ring = [
    (0.1, 1 + k * step) if k % 2 == 0 else (0.9, 1.5 + k * step) for k in range(count)
  ]
  return ring + [(0.05, ring[-1][1]), (0.05, 0.5)]


_RNG = np.random.default_rng(3)


_HOSTILE = {
  # 16,777,216 rows of 1 pixel (within --max-pixels): the fill visits every
  # edge on every row; took 133 s.
  'a tall image': (
    [(float(k % 2), 16_000.0 * k) for k in range(1000)],
    16_777_216,
    1,
    'steps',
  ),
  # Edges of 2,000,000 pixels: the outline is drawn outside the image too;
  # took 24 s.
  'far zigzag': (
    [((-1e6 if k % 2 else 1e6), 100.0 + k % 3) for k in range(10_000)],
    256,
    256,
    'steps',
  ),
  # Every edge starting on a row is compared with those before it (a
  # million random vertices in 50 rows took Pillow 9 minutes).
  'random in a strip': (
    [(float(x), float(y)) for x, y in _RNG.uniform((0, 0), (512, 8), (200_000, 2))],
    8,
    512,
    'steps',
  ),
  # Cheap to fill, quadratic to check: GEOS took 8 s.
  'a folded ring': (_folded_ring(80_000), 12, 2, 'pairs of edges'),
}


@pytest.mark.parametrize('case', list(_HOSTILE))
def test_a_contour_too_costly_to_draw_or_check_is_refused_at_once(case):
  vertices, rows, columns, limit = _HOSTILE[case]
  start = time.monotonic()
  with pytest.raises(ContourError, match=limit):
    masks.rasterise(vertices, rows, columns)
  assert time.monotonic() - start < 10  # well under a second here


def test_contours_within_the_limits_are_drawn_as_the_reference_draws_them():
  angles = np.linspace(0, 2 * np.pi, masks.MAX_VERTICES, endpoint=False)
  ring = list(zip(8 + 5 * np.cos(angles), 8 + 5 * np.sin(angles), strict=True))
  np.testing.assert_array_equal(
    masks.rasterise(ring, 16, 16), reference_mask(ring, 16, 16)
  )
  rng = np.random.default_rng(5)
  # Near the limits: random vertices over 256 x 256 (near the edge pairs
  # allowed) and over 4096 x 4096 (near the fill steps allowed).
  dense = [(float(x), float(y)) for x, y in rng.uniform(0, 256, (6000, 2))]
  tall = [(float(x), float(y)) for x, y in rng.uniform(0, 4096, (6000, 2))]
  for vertices, rows, columns in ((dense, 256, 256), (tall, 4096, 4096)):
    points = masks._points(vertices)
    assert masks.fill_steps(points, rows, columns) <= masks.MAX_FILL_STEPS
    assert masks.edge_pairs(points) <= masks.MAX_EDGE_PAIRS
    start = time.monotonic()
    mask = masks.rasterise(vertices, rows, columns)
    assert time.monotonic() - start < 20  # under a second here
    np.testing.assert_array_equal(mask, reference_mask(vertices, rows, columns))


def test_the_cost_model_counts_what_pillow_does():
  # A 10 x 5 rectangle at (2, 1) in an 8 x 20 image.
  rectangle = np.array([(2, 1), (12, 1), (12, 6), (2, 6)], dtype=np.float64)
  outline = 10 + 5 + 10 + 5 + 4  # pixels, and a step a vertex
  horizontal = 11 + 11 + 2  # the two spans, and a step an edge
  scanned = 6 * 2  # rows 1 to 6, each testing the two other edges
  sort = 12 * 3  # 12 crossings, log2 of 2 x 2 edges + 2, rounded up
  corners = 0  # both other edges are vertical: Pillow joins no corner
  spans = 6 * 20
  steps = outline + horizontal + scanned + sort + corners + spans
  assert masks.fill_steps(rectangle, 8, 20) == steps
  # Below the image: Pillow scans its last two rows, crossing nothing.
  assert masks.fill_steps(rectangle + (0, 100), 8, 20) == outline + 2 + 2 * 2 + 2 * 20
  # The pairs of its 4 edges: on either axis all 6 but the two sides apart
  # along it.
  assert masks.edge_pairs(rectangle) == 5


# The launcher's header read: bounded like the decode stage's reads.


@pytest.fixture
def bomb_tree(tmp_path):
  """A tree whose first patient's slice 1 (the survey reads it) is a 2 MB
  deflated file inflating to 2 GiB of Pixel Data."""
  root, manifest = _tree(tmp_path)
  pid = manifest.links[0][0]
  path = os.path.join(root, 'dicoms', pid, '1.dcm')
  os.replace(path, str(tmp_path / 'template.dcm'))
  size = write_deflate_bomb(path, str(tmp_path / 'template.dcm'), 2 << 30)
  assert size < 3 << 20
  return root, f'dicoms/{pid}/1.dcm'


def test_the_survey_reads_a_deflate_bomb_within_a_mib(bomb_tree, tmp_path):
  root, _ = bomb_tree
  plain = str(tmp_path / 'PLAIN')
  sample.make_tree(
    plain, patients=2, slices=3, rows=ROWS, columns=COLUMNS, contour_every=1
  )
  tracemalloc.start()
  try:
    found = preflight.survey(root)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 16 << 20  # pydicom inflated it whole: 2.2 bytes per byte inflated
  # The bomb's header is read like any other: the same estimate as the
  # same tree without the bomb.
  assert found.slices == 6
  assert found.bytes_per_slice == preflight.survey(plain).bytes_per_slice


def test_a_header_beyond_max_pixels_counts_for_nothing_in_the_estimate(tmp_path):
  root, manifest = _tree(tmp_path)
  before = preflight.survey(root).bytes_per_slice
  path = os.path.join(root, 'dicoms', manifest.links[0][0], '1.dcm')
  ds = pydicom.dcmread(path)
  ds.Rows = ds.Columns = 65535  # 8 GiB a row: the decode stage refuses it
  ds.save_as(path)
  assert preflight.survey(root).bytes_per_slice == before
  assert preflight.survey(root, max_pixels=65535 * 65535).bytes_per_slice > 1 << 30


def test_a_deflate_bomb_slice_is_one_row_and_the_launcher_stays_small(
  bomb_tree, tmp_path
):
  root, bomb = bomb_tree
  out = str(tmp_path / 'OUT')
  run = _measured(tmp_path, root, out)
  assert run.code == cli.EXIT_DROPPED, run.stderr[-2000:]
  errors = read_errors(out).to_pylist()
  assert [(r['path'], r['stage']) for r in errors] == [(bomb, schema.STAGE_DECODE)]
  assert 'inflates to more than' in errors[0]['error']
  assert len(open_dataset(out).to_table(columns=['slice_index'])) == 5


# link.csv: a size limit, and its problem rows counted past 100 per status.


def _repeated_links(pid: str, oid: str, rows: int) -> bytes:
  return b'patient_id,original_id\n' + f'{pid},{oid}\n'.encode() * rows


def test_repeated_rows_are_listed_up_to_a_hundred_then_counted():
  data = _repeated_links('P1', 'O1', 500_000) + b'bad id!,O2\n' * 150 + b'P3,O3\n'
  links, problems = layout.parse_links(data)
  assert [(link.patient_id, link.line) for link in links] == [('P1', 2), ('P3', 500152)]
  by_status = {}
  for problem in problems:
    by_status.setdefault(problem.status, []).append(problem)
  duplicates, malformed = (
    by_status[schema.DUPLICATE_LINK],
    by_status[schema.MALFORMED_LINK],
  )
  assert len(duplicates) == len(malformed) == layout.LISTED_LINK_PROBLEMS + 1
  assert duplicates[99].detail.startswith('line 102: ')
  assert duplicates[-1].detail.startswith(
    'lines 103 to 500001: 499,899 more duplicate_link rows, not listed one by one'
  )
  assert malformed[-1].detail.startswith(
    'lines 500102 to 500151: 50 more malformed_link'
  )
  assert problems[-2:] == [duplicates[-1], malformed[-1]]  # the counts last
  # With a key: the same rows, ids as pseudonyms, none in the counted rows.
  keyed_links, keyed = layout.parse_links(data, Pseudonyms(b'k' * 32))
  assert len(keyed) == len(problems) and keyed[-2:] == problems[-2:]
  assert 'P1' not in ''.join(p.patient_id + p.detail for p in keyed)


def test_a_link_file_of_500_000_repeated_rows_is_bounded(tmp_path):
  root, manifest = _tree(tmp_path)
  (pid, oid), (other, other_oid) = manifest.links
  data = _repeated_links(pid, oid, 500_000) + f'{other},{other_oid}\n'.encode()
  assert len(data) > 10 << 20
  _write(root, layout.LINK_FILE, data)
  out = str(tmp_path / 'OUT')
  run = _measured(tmp_path, root, out)
  assert run.code == cli.EXIT_DROPPED, run.stderr[-2000:]
  rows = read_reconciliation(out).to_pylist()
  duplicates = [r for r in rows if r['status'] == schema.DUPLICATE_LINK]
  assert len(duplicates) == 101 and len(rows) == 103  # and the 2 matched
  counted = [r for r in duplicates if r['detail'].startswith('lines ')]
  assert [(r['patient_id'], r['original_id']) for r in counted] == [('', '')]
  assert counted[0]['detail'].startswith(
    'lines 103 to 500001: 499,899 more duplicate_link rows'
  )
  assert len(open_dataset(out).to_table(columns=['slice_index'])) == 6


def test_a_link_file_over_the_limit_is_one_row_and_is_not_read(tmp_path):
  root, manifest = _tree(tmp_path)
  padding = b'#' * layout.MAX_LINK_BYTES
  _write(root, layout.LINK_FILE, _repeated_links(*manifest.links[0], 1) + padding)
  assert preflight.survey(root).slices == 0  # as the listing reads it: no link
  out = str(tmp_path / 'OUT')
  logging.basicConfig(stream=sys.__stderr__, level=logging.INFO, force=True)
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_DROPPED
  rows = read_reconciliation(out).to_pylist()
  unlinked = [schema.UNLINKED_DICOMS, schema.UNLINKED_CONTOURS] * 2
  assert sorted(r['status'] for r in rows) == sorted([schema.MALFORMED_LINK, *unlinked])
  malformed = next(r for r in rows if r['status'] == schema.MALFORMED_LINK)
  assert malformed['detail'] == (
    'link.csv holds more than 16,777,216 bytes (16 MiB), the most it may hold; '
    'no row is read'
  )
  oversized = b'x' * (layout.MAX_LINK_BYTES + 1)
  assert layout.parse_links(oversized) == ([], [layout.oversized_links()])


@pytest.mark.parametrize(
  'name',
  [
    'MR_small.dcm',
    'MR_small_implicit.dcm',
    'MR_small_bigendian.dcm',
    'MR_small_RLE.dcm',
    'SC_rgb_jpeg_dcmtk.dcm',
    'image_dfl.dcm',  # deflated
  ],
)
def test_the_bounded_header_read_agrees_with_pydicom(name):
  path = get_testdata_file(name)
  ds = pydicom.dcmread(path, stop_before_pixels=True)
  expected = (ds.Rows, ds.Columns, ds.get('SamplesPerPixel', 1), ds.BitsAllocated)
  assert preflight.image_size(path) == expected
