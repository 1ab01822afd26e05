"""Memory against data size: peak RSS by process role at 1x, 20x and 100x.

    python bench/scale.py --trees bench/data/x1,bench/data/x20,bench/data/x100
    python bench/scale.py --trees bench/data/x1,bench/data/x20 --compare before=HEAD~1
    python bench/scale.py --trees bench/data/x1,bench/data/x100 --env MALLOC_ARENA_MAX=2

Runs the pipeline on each tree in each DirectRunner mode (in-process, one
worker process per core), default options otherwise, and samples every 50 ms
the RSS of the launcher (in multi-process mode, the runner) and of everything
under it (worker processes, decoder children). Prints the peaks, the peak of
their sum (issue 16 target 4: the whole process tree at 100x within 1.2x of
1x, in every mode) and each tree's ratio to the first. ``--compare`` runs
another version too, ``--env`` this one with extra environment variables;
runs are interleaved, and the median of ``--runs`` is shown.
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
from typing import NamedTuple

import psutil

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run  # noqa: E402  (bench/run.py: checkout, settle, count_slices, ...)

MODES = {'in-process': run.IN_PROCESS, f'{run.CORES} processes': run.PROCESSES}


class Peak(NamedTuple):
  launcher: int  # bytes
  rest: int  # everything under the launcher, at its peak
  total: int  # the whole tree, at its peak
  seconds: float


def peak_rss(command: list[str], env: dict, cwd: str) -> Peak:
  """Runs ``command``; the peak RSS of its launcher, of the rest and of both."""
  start = time.perf_counter()
  process = psutil.Popen(
    command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd
  )
  launcher = rest = total = 0
  while process.poll() is None:
    try:
      own = process.memory_info().rss
      under = sum(c.memory_info().rss for c in process.children(recursive=True))
    except psutil.Error:
      continue
    launcher, rest = max(launcher, own), max(rest, under)
    total = max(total, own + under)
    time.sleep(0.05)
  err = process.stderr.read().decode(errors='replace')
  if process.returncode not in (0, 3):
    raise RuntimeError(f'{command} failed ({process.returncode}):\n{err[-3000:]}')
  return Peak(launcher, rest, total, time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--trees', required=True, help='comma-separated, 1x first')
  parser.add_argument('--runs', type=int, default=1)
  parser.add_argument(
    '--modes', default='in-process,processes', help='in-process, processes or both'
  )
  parser.add_argument('--compare', action='append', default=[], help='LABEL=REF')
  parser.add_argument(
    '--env', action='append', default=[], help='KEY=VALUE: a variant of this version'
  )
  args = parser.parse_args(argv)
  trees = [os.path.abspath(tree) for tree in args.trees.split(',')]
  chosen = args.modes.split(',')
  modes = {
    label: extra
    for label, extra in MODES.items()
    if label.split()[-1] in chosen or label in chosen
  }
  scratch = tempfile.mkdtemp(prefix='scale-', dir=os.path.join(BENCH, 'data'))
  versions = {'this': (run.REPO, {})}
  for spec in args.compare:
    label, ref = spec.split('=', 1)
    versions[label] = (run.checkout(ref, scratch), {})
  if args.env:
    versions['this, ' + ' '.join(args.env)] = (
      run.REPO,
      dict(item.split('=', 1) for item in args.env),
    )
  out = os.path.join(scratch, 'out')
  found: dict[tuple, list[Peak]] = {}
  for k in range(args.runs):
    for tree in trees if k % 2 == 0 else trees[::-1]:
      for mode, extra in modes.items():
        for label, (repo, extra_env) in versions.items():
          where = run._in(repo)  # noqa: SLF001 (the bench's own helper)
          run.settle(out)
          command = run.pipeline_command(tree, out, extra, repo)
          peak = peak_rss(command, {**where['env'], **extra_env}, where['cwd'])
          found.setdefault((label, mode, tree), []).append(peak)
          print(
            f'{label} {mode} {tree}: {_mib(peak.total)} MiB, {peak.seconds:.1f} s',
            flush=True,
          )
  run.settle(out)
  shutil.rmtree(scratch, ignore_errors=True)
  print()
  print(
    '| version | mode | tree | slices | launcher MiB | rest MiB | whole tree MiB '
    '| vs 1x | wall s |'
  )
  print('| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
  for label in versions:
    for mode in modes:
      base = None
      for tree in trees:
        peaks = found[label, mode, tree]
        total = statistics.median(p.total for p in peaks)
        base = base or total
        print(
          f'| {label} | {mode} | {os.path.basename(tree)} '
          f'| {run.count_slices(tree):,} '
          f'| {_mib(statistics.median(p.launcher for p in peaks))} '
          f'| {_mib(statistics.median(p.rest for p in peaks))} '
          f'| {_mib(total)} | {total / base:.2f}x '
          f'| {statistics.median(p.seconds for p in peaks):.1f} |'
        )


def _mib(n: float) -> str:
  return f'{n / 2**20:,.0f}'


if __name__ == '__main__':
  main()
