"""Benchmark: the fixed cost of a run, and how much of it the install decides.

    python bench/fixed.py --python /path/to/runtime-venv/bin/python --runs 5

Times, in interleaved rounds, for each interpreter (this one, and each
``--python``: e.g. a venv with only requirements.txt, what the README's
first command installs): ``import apache_beam`` alone, the pipeline's
imports, and a whole 1-patient run (230 slices of 256 x 256, the generator's
tree) in the mode the pipeline picks (in-process at this size). Issue 16's
target 2: a 1-patient run in at most 1.5 s. Prints medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from run import REPO, settle

_IMPORTS = (
  'import apache_beam, pyarrow.parquet, pydicom, numpy; import beam_pipeline.launch.run'
)


def _seconds(command: list[str]) -> float:
  start = time.perf_counter()
  subprocess.run(
    command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
  )
  return time.perf_counter() - start


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--python', action='append', default=[], help='another interpreter'
  )
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args(argv)
  sys.path.insert(0, REPO)
  from beam_pipeline.tools import sample

  scratch = tempfile.mkdtemp(prefix='bench-fixed-')
  tree, out = os.path.join(scratch, 'one'), os.path.join(scratch, 'out')
  sample.make_tree(tree, patients=1, slices=230, rows=256, columns=256, contour_every=9)
  pythons = [sys.executable, *args.python]
  steps = {
    'import apache_beam': lambda py: [py, '-c', 'import apache_beam'],
    "the pipeline's imports": lambda py: [py, '-c', _IMPORTS],
    '1-patient run (230 slices)': lambda py: [
      py,
      os.path.join(REPO, 'run_pipeline.py'),
      '--input',
      tree,
      '--output',
      out,
      '--overwrite',
    ],
  }
  times = {(py, step): [] for py in pythons for step in steps}
  for k in range(args.runs):
    for py in pythons if k % 2 == 0 else reversed(pythons):
      for step, command in steps.items():
        settle(out)
        times[py, step].append(_seconds(command(py)))
  shutil.rmtree(scratch, ignore_errors=True)
  print(f'{args.runs} interleaved rounds, medians (s)\n')
  print('| interpreter | ' + ' | '.join(steps) + ' |')
  print('| --- |' + ' ---: |' * len(steps))
  for py in pythons:
    cells = [f'{statistics.median(times[py, step]):.2f}' for step in steps]
    print(f'| {py} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
