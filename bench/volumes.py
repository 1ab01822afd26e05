"""Benchmark: volume assembly of one cine patient (issue 33's "well under a
second" for 240 slices).

    python bench/volumes.py --runs 7

Generates one patient of ``--locations`` x ``--phases`` slices of 256 x 256
(the generator's cine geometry, oblique), writes it with the pipeline, then in
one process pinned to one core times, in interleaved rounds: reading the
patient's rows (one filtered scan, every column: the floor any assembly
pays), ``volumes()`` with stacking, with stacking and the label map, and the
checks alone (``stack=False``). Prints medians and each against the row read.
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

from run import REPO, pipeline_command

_TIMER = """
import json, os, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import pyarrow.compute as pc
from beam_pipeline.dataset import open_dataset
from beam_pipeline.dataset.volumes import volumes
out, pid, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rows():
  return open_dataset(out).to_table(filter=pc.field('patient_id') == pid).num_rows
def stacked(**kw):
  return sum(len(v.slices) for v in volumes(out, pid, **kw) if not v.problems)
def checks():
  return sum(len(v.slices) for v in volumes(out, pid, stack=False))
cases = {'rows': rows, 'stack': stacked, 'stack+labels': lambda: stacked(labels=True),
         'checks only': checks}
for run in cases.values():
  run()  # page cache, digests
times = {name: [] for name in cases}
for k in range(runs):
  for name in (list(cases) if k % 2 == 0 else list(reversed(cases))):
    start = time.perf_counter()
    n = cases[name]()
    times[name].append(time.perf_counter() - start)
    assert n, name
print(json.dumps(times))
"""


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', type=int, default=7)
  parser.add_argument('--locations', type=int, default=24)
  parser.add_argument('--phases', type=int, default=10)
  args = parser.parse_args(argv)
  sys.path.insert(0, REPO)
  from beam_pipeline.tools import sample

  scratch = tempfile.mkdtemp(prefix='bench-volumes-')
  data, out = os.path.join(scratch, 'DATA'), os.path.join(scratch, 'OUT')
  cine = sample.Cine(locations=args.locations, phases=args.phases)
  sample.make_tree(data, patients=1, rows=256, columns=256, cine=cine)
  env = {**os.environ, 'PYTHONPATH': REPO}
  done = subprocess.run(
    pipeline_command(data, out, [], REPO), env=env, cwd=REPO, capture_output=True
  )
  if done.returncode != 0:
    sys.exit(f'the pipeline failed:\n{done.stderr.decode()[-2000:]}')
  pid = sorted(os.listdir(os.path.join(data, 'dicoms')))[0]
  timed = subprocess.run(
    [sys.executable, '-c', _TIMER, out, pid, str(args.runs)],
    env=env,
    cwd=REPO,
    capture_output=True,
  )
  if timed.returncode != 0:
    sys.exit(f'the timing failed:\n{timed.stderr.decode()[-2000:]}')
  times = json.loads(timed.stdout)
  slices = args.locations * args.phases
  print(
    f'one patient, {slices} slices of 256 x 256 ({args.locations} locations x '
    f'{args.phases} phases), one core, {args.runs} interleaved rounds\n'
  )
  print('| step | median ms | vs reading the rows |')
  print('| --- | --- | --- |')
  floor = times['rows']
  for name, got in times.items():
    ratio = statistics.median(t / f for t, f in zip(got, floor, strict=True))
    print(f'| {name} | {1000 * statistics.median(got):.0f} | {ratio:.2f}x |')
  shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
