"""Benchmark: an incremental run that adds one patient, against a full run.

    python bench/incremental.py --data bench/data/x20 [--runs 3] [--write BENCHMARKS.md]

In a scratch folder, ``--data`` is linked file by file into a tree of its
own (hard links: no copy of the pixels). Each round, from the same state
(outputs gone, dirty pages synced, a pause, the tree's files older than the
racy window), then:

1. a full run of the tree into a new output (version 0), timed;
2. one generated patient (the project's generator, as many slices as the
   tree's patients hold on average, distinct from every other: no duplicate
   flag reaches a kept patient's rows) is added to the tree, and a run
   into the same output, which decodes only that patient and keeps the
   others' rows (version 1), is timed;
3. the patient is removed again;
4. a full run of a tree of that patient alone, timed: the floor of any run
   that decodes one patient (the fixed cost of a run, with Beam's, plus one
   patient's decoding).

Prints the medians, and per round and as medians: incremental / full (the
issue's target: at most 0.10), incremental / one-patient run (how near the
floor it is), and (incremental - one patient) / (full - one patient), what
an incremental run costs above the floor against what a full run does. All
are whole processes (``run_pipeline.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from beam_pipeline.tools import sample  # noqa: E402
from transforms.contract import layout  # noqa: E402

PAUSE = 2.0


def _link_tree(data: str, tree: str) -> None:
  """``data`` under ``tree``, every file a hard link."""
  for folder, _, names in os.walk(data):
    target = os.path.join(tree, os.path.relpath(folder, data))
    os.makedirs(target, exist_ok=True)
    for name in names:
      source = os.path.join(folder, name)
      if name == layout.LINK_FILE and folder == data:
        shutil.copy(source, target)  # rewritten when a patient is added
      else:
        os.link(source, os.path.join(target, name))


def _average_slices(data: str) -> int:
  folders = os.listdir(os.path.join(data, layout.DICOM_DIR))
  total = sum(len(os.listdir(os.path.join(data, layout.DICOM_DIR, f))) for f in folders)
  return max(1, total // max(1, len(folders)))


def _settle(*outputs: str) -> None:
  for path in outputs:
    shutil.rmtree(path, ignore_errors=True)
  os.sync()
  time.sleep(max(PAUSE, layout.RACY_NS / 1e9 + 0.1))


def _timed(tree: str, out: str) -> tuple[float, dict]:
  command = [
    sys.executable,
    os.path.join(ROOT, 'run_pipeline.py'),
    '--input',
    tree,
    '--output',
    out,
  ]
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - start
  if done.returncode not in (0, 3):
    raise RuntimeError(f'{command} failed:\n{done.stderr[-3000:]}')
  from beam_pipeline.dataset import versions

  return seconds, versions.record(out)['patients']


class _Patient:
  """A generated patient, added to and removed from a tree."""

  def __init__(self, scratch: str, slices: int, rows: int, columns: int):
    self.source = os.path.join(scratch, 'NEW')
    # the generator's sixth patient: the benchmark trees are made of copies
    # of its first five (bench/make_dataset.py), and a copy of one would
    # flag a kept patient's rows as duplicates
    sample.make_tree(self.source, patients=6, slices=slices, rows=rows, columns=columns)
    with open(os.path.join(self.source, layout.LINK_FILE)) as f:
      self.line = f.read().splitlines()[6]
    self.pid, self.oid = self.line.split(',')

  def add(self, tree: str) -> None:
    for top, owner in ((layout.DICOM_DIR, self.pid), (layout.CONTOUR_DIR, self.oid)):
      shutil.copytree(
        os.path.join(self.source, top, owner), os.path.join(tree, top, owner)
      )
    with open(os.path.join(tree, layout.LINK_FILE), 'a') as f:
      f.write(self.line + '\n')

  def remove(self, tree: str, links: str) -> None:
    for top, owner in ((layout.DICOM_DIR, self.pid), (layout.CONTOUR_DIR, self.oid)):
      shutil.rmtree(os.path.join(tree, top, owner))
    with open(os.path.join(tree, layout.LINK_FILE), 'w') as f:
      f.write(links)


def _image_size(data: str) -> tuple[int, int]:
  import pydicom

  folder = os.path.join(data, layout.DICOM_DIR)
  first = sorted(os.listdir(folder))[0]
  name = sorted(os.listdir(os.path.join(folder, first)))[0]
  ds = pydicom.dcmread(os.path.join(folder, first, name), stop_before_pixels=True)
  return int(ds.Rows), int(ds.Columns)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='a data tree (100 patients)')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--write', help='append the table to this Markdown file')
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix='bench-incremental-') as scratch:
    tree, out = os.path.join(scratch, 'TREE'), os.path.join(scratch, 'OUT')
    _link_tree(args.data, tree)
    with open(os.path.join(tree, layout.LINK_FILE)) as f:
      links = f.read()
    patients = len(links.splitlines()) - 1
    new = _Patient(scratch, _average_slices(args.data), *_image_size(args.data))
    alone = os.path.join(scratch, 'ALONE')
    with open(os.path.join(new.source, layout.LINK_FILE)) as f:
      header = f.read().splitlines()[0]
    os.makedirs(os.path.join(alone, layout.DICOM_DIR))
    os.makedirs(os.path.join(alone, layout.CONTOUR_DIR))
    new.add(alone)
    with open(os.path.join(alone, layout.LINK_FILE), 'w') as f:
      f.write(f'{header}\n{new.line}\n')
    one_out = os.path.join(scratch, 'ONE')
    full, added, one, ratios = [], [], [], []
    for k in range(args.runs):
      _settle(out)
      seconds, counted = _timed(tree, out)
      assert counted['added'] == patients, counted
      full.append(seconds)
      new.add(tree)
      _settle()
      seconds, counted = _timed(tree, out)
      assert (counted['added'], counted['kept']) == (1, patients), counted
      added.append(seconds)
      new.remove(tree, links)
      _settle(one_out)
      one.append(_timed(alone, one_out)[0])
      ratios.append(
        (
          added[-1] / full[-1],
          added[-1] / one[-1],
          (added[-1] - one[-1]) / (full[-1] - one[-1]),
        )
      )
      print(
        f'round {k + 1}: full {full[-1]:.1f} s, one patient added '
        f'{added[-1]:.1f} s, one patient alone {one[-1]:.1f} s; ratios '
        + ', '.join(f'{r:.3f}' for r in ratios[-1]),
        flush=True,
      )
  median = [statistics.median(r[i] for r in ratios) for i in range(3)]
  rows = [
    f'| full run, {patients} patients | {statistics.median(full):.1f} s | 1 | |',
    f'| incremental run, 1 patient added to {patients} '
    f'| {statistics.median(added):.1f} s | {median[0]:.3f} | {median[1]:.2f} |',
    f'| full run of that 1 patient alone | {statistics.median(one):.1f} s '
    f'| {statistics.median(o / f for o, f in zip(one, full, strict=True)):.3f} | 1 |',
  ]
  table = '\n'.join(
    [
      f'Medians of {args.runs} interleaved rounds. Above the one-patient '
      f'floor, the incremental run costs {median[2]:.3f} of what the full '
      'run costs (per round: ' + ', '.join(f'{r[2]:.3f}' for r in ratios) + ').',
      '',
      '| run | wall time | ratio to the full run | ratio to 1 patient alone |',
      '| --- | --- | --- | --- |',
      *rows,
    ]
  )
  print(table)
  print(json.dumps({'full': full, 'added': added, 'one': one, 'ratios': ratios}))
  if args.write:
    with open(args.write, 'a') as f:
      f.write('\n' + table + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
