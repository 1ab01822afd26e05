"""Hostile inputs of unbounded work: time and peak RSS of the worst cases.

    python bench/hostile.py [--cases NAME,...] [--write BENCHMARKS.md]

Absolute figures, not ratios: each case is a small generated tree (2
patients of 3 slices) with one hostile input, given to the real entry point
(``run_pipeline.py``) in a subprocess; the table gives its wall time, the
peak RSS of its whole process tree (sampled every 50 ms, bench/run.py's
``measure``) and what the run made of the input. ``plain`` is the same tree
without it. A second table times one contour at each of its limits
(transforms/decode/masks.py), in this process: parsing, the cost check,
Pillow's fill and the quality checks (GEOS).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

import run  # noqa: E402  (bench/run.py: measure, pipeline_command)

from beam_pipeline.dataset import read_errors, read_reconciliation  # noqa: E402
from beam_pipeline.tools import sample  # noqa: E402
from tests.helpers import random_contour, write_deflate_bomb  # noqa: E402
from transforms.contract import layout, schema  # noqa: E402
from transforms.decode import masks, quality  # noqa: E402

ROWS, COLUMNS = 64, 48


def _tree(scratch: str) -> tuple[str, sample.Manifest]:
  root = os.path.join(scratch, 'DATA')
  shutil.rmtree(root, ignore_errors=True)
  manifest = sample.make_tree(
    root, patients=2, slices=3, rows=ROWS, columns=COLUMNS, contour_every=1
  )
  return root, manifest


def _write(root: str, relative: str, data: bytes) -> None:
  path = os.path.join(root, *relative.split('/'))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _contour(manifest, kind: str, k: int) -> str:
  original = manifest.links[0][1]
  return f'contourfiles/{original}/{kind}-contours/{layout.contour_name(kind, k)}'


def plain(root, manifest) -> str:
  return 'the tree as generated'


def contour_600k(root, manifest) -> str:
  data = random_contour(600_000, ROWS, COLUMNS)
  _write(root, _contour(manifest, 'i', 1), data)
  return f'a contour of 600,000 random vertices ({len(data) / 1e6:.1f} MB)'


def contour_3m(root, manifest) -> str:
  data = random_contour(3_000_000, ROWS, COLUMNS)
  _write(root, _contour(manifest, 'i', 1), data)
  return f'a contour of 3,000,000 random vertices ({len(data) / 1e6:.1f} MB)'


def contour_ring(root, manifest) -> str:
  angles = np.linspace(0, 2 * np.pi, masks.MAX_VERTICES, endpoint=False)
  ring = zip(32 + 20 * np.cos(angles), 24 + 15 * np.sin(angles), strict=True)
  data = ''.join(f'{x:.4f} {y:.4f}\n' for x, y in ring).encode()
  _write(root, _contour(manifest, 'i', 1), data)
  return f'a ring of 1,000,000 vertices, the most allowed ({len(data) / 1e6:.0f} MB)'


def deflate_bomb(root, manifest) -> str:
  path = os.path.join(root, 'dicoms', manifest.links[0][0], '1.dcm')
  template = path + '.template'
  os.replace(path, template)
  size = write_deflate_bomb(path, template, 2 << 30)
  os.remove(template)
  return f'slice 1 deflated, {size / 1e6:.1f} MB inflating to 2 GiB'


def repeated_links(root, manifest) -> str:
  (pid, oid), (other, other_oid) = manifest.links
  rows = f'{pid},{oid}\n'.encode() * 500_000 + f'{other},{other_oid}\n'.encode()
  data = b'patient_id,original_id\n' + rows
  _write(root, layout.LINK_FILE, data)
  return f'link.csv of 500,000 repeated rows ({len(data) / 1e6:.1f} MB)'


def oversized_links(root, manifest) -> str:
  pid, oid = manifest.links[0]
  head = f'patient_id,original_id\n{pid},{oid}\n'.encode()
  _write(root, layout.LINK_FILE, head + b'#' * layout.MAX_LINK_BYTES)
  return 'link.csv of 16 MiB and 38 bytes'


CASES = {
  f.__name__: f
  for f in (
    plain,
    contour_600k,
    contour_3m,
    contour_ring,
    deflate_bomb,
    repeated_links,
    oversized_links,
  )
}


def _outcome(out: str) -> str:
  """What the run made of it: its error rows and problem rows, in short."""
  errors = read_errors(out).to_pylist()
  rows = read_reconciliation(out).to_pylist()
  problems = [r for r in rows if r['status'] != schema.MATCHED]
  by_status = collections.Counter(r['status'] for r in problems)
  counts = ', '.join(f'{n} `{status}`' for status, n in sorted(by_status.items()))
  parts = [f'{len(errors)} error rows', f'{len(problems)} problem rows ({counts})']
  for row in errors[:1]:
    parts.append(f'`{row["stage"]}`: {row["error"][:70]}')
  for row in [r for r in problems if not r['patient_id'] and not r['original_id']][:1]:
    parts.append(f'`{row["status"]}`: {row["detail"][:70]}')  # of the whole file
  return '; '.join(parts)


def _ring(n: int) -> list[tuple[float, float]]:
  angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
  return [(8 + 5 * float(np.cos(a)), 8 + 5 * float(np.sin(a))) for a in angles]


def _random(
  n: int, rows: int, columns: int, seed: int = 5
) -> list[tuple[float, float]]:
  points = np.random.default_rng(seed).uniform((0, 0), (columns, rows), (n, 2))
  return [(float(x), float(y)) for x, y in points]


def _folded(n: int) -> list[tuple[float, float]]:
  step = 9.0 / n
  ring = [
    (0.1, 1 + k * step) if k % 2 == 0 else (0.9, 1.5 + k * step) for k in range(n)
  ]
  return ring + [(0.05, ring[-1][1]), (0.05, 0.5)]


def _zigzag(n: int) -> list[tuple[float, float]]:
  return [((-1e6 if k % 2 else 1e6), 100.0 + k % 3) for k in range(n)]


# One contour near each limit, accepted: (what, vertices, rows, columns).
AT_LIMITS = (
  ('a ring of 1,000,000 vertices (the vertex limit)', lambda: _ring(1_000_000), 16, 16),
  (
    '6,300 random vertices in 4096 x 4096',
    lambda: _random(6300, 4096, 4096),
    4096,
    4096,
  ),
  (
    '40 random vertices in 1,000,000 x 16',
    lambda: _random(40, 1_000_000, 16),
    1_000_000,
    16,
  ),
  ('99 vertices 2,000,000 pixels apart', lambda: _zigzag(99), 256, 256),
  ('a ring of 19,000 vertices folded on itself', lambda: _folded(19_000), 12, 2),
)


def _contour_table() -> list[str]:
  lines = [
    '| contour | fill steps | edge pairs | parse s | cost check s | fill s '
    '| quality checks s |',
    '| --- | --- | --- | --- | --- | --- | --- |',
  ]
  for what, make, rows, columns in AT_LIMITS:
    data = ''.join(f'{x!r} {y!r}\n' for x, y in make()).encode()
    start = time.perf_counter()
    vertices = masks.parse_contour(data)
    parsed = time.perf_counter()
    masks.check_cost(vertices, rows, columns)
    checked = time.perf_counter()
    mask = masks.rasterise(vertices, rows, columns)  # checks again, then fills
    filled = time.perf_counter()
    quality.contour_checks('i', vertices, mask)
    done = time.perf_counter()
    points = masks._points(vertices)
    steps = masks.fill_steps(points, rows, columns)
    pairs = masks.edge_pairs(points)
    fill = max(0.0, (filled - checked) - (checked - parsed))
    line = (
      f'| {what} | {steps:,} | {pairs:,} | {parsed - start:.2f} | '
      f'{checked - parsed:.2f} | {fill:.2f} | {done - filled:.2f} |'
    )
    print(line, flush=True)
    lines.append(line)
  return lines


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--write', help='append the tables to this Markdown file')
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix='bench-hostile-')
  lines = [
    '| case | seconds | peak RSS of the process tree (MiB) | outcome |',
    '| --- | --- | --- | --- |',
  ]
  for name in args.cases.split(','):
    root, manifest = _tree(scratch)
    described = CASES[name](root, manifest)
    out = os.path.join(scratch, 'OUT')
    run.settle(out)
    measured = run.measure(run.pipeline_command(root, out, []), **run._in(run.REPO))
    line = (
      f'| {described} | {measured.seconds:.1f} | {measured.peak / 2**20:.0f} | '
      f'{_outcome(out)} |'
    )
    print(line, flush=True)
    lines.append(line)
  lines += ['', *_contour_table()]
  table = '\n'.join(lines)
  print(table)
  if args.write:
    with open(args.write, 'a') as f:
      f.write('\n' + table + '\n')
  shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
