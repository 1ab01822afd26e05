"""Benchmark: the pipeline against a plain script and a decode-only limit.

    python bench/run.py --data bench/data/x20 --runs 3 [--write BENCHMARKS.md]

Runs, on the same tree and in one invocation: the baseline (bench/baseline.py,
sequential), the limit (bench/limit.py: decode only, one process per core) and
the pipeline (run_pipeline.py) in the configurations below; each --runs times.
Prints one table of medians: slices/s, wall seconds, peak RSS of the whole
process tree, and the ratios against the baseline and the limit. Also the
pipeline's fixed start-up cost (a 1-patient tree), its peak RSS on a 1x and a
20x tree (--memory-base, --memory-big), and whether its output is the same
whatever the number of workers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
import pyarrow.parquet as pq

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
CORES = os.cpu_count() or 1

from beam_pipeline import sample  # noqa: E402


def measure(command: list[str]) -> tuple[float, int]:
  """Runs ``command``; returns (wall seconds, peak RSS of its process tree)."""
  start = time.perf_counter()
  process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  peak = 0
  while process.poll() is None:
    rss = 0
    try:
      for p in [process, *process.children(recursive=True)]:
        rss += p.memory_info().rss
    except psutil.Error:
      pass
    peak = max(peak, rss)
    time.sleep(0.05)
  seconds = time.perf_counter() - start
  err = process.stderr.read().decode(errors='replace')
  if process.returncode not in (0, 3):
    raise RuntimeError(f'{command} failed ({process.returncode}):\n{err[-3000:]}')
  return seconds, peak


def count_slices(data: str) -> int:
  return sum(
    1
    for _, _, files in os.walk(os.path.join(data, 'dicoms'))
    for name in files
    if name.endswith('.dcm')
  )


def pipeline_command(data: str, out: str, extra: list[str]) -> list[str]:
  return [
    sys.executable,
    os.path.join(REPO, 'run_pipeline.py'),
    '--input',
    data,
    '--output',
    out,
    '--overwrite',
    *extra,
  ]


def modes(data: str, scratch: str) -> dict[str, list[str]]:
  return {
    'baseline (sequential script)': [
      sys.executable,
      os.path.join(BENCH, 'baseline.py'),
      data,
      os.path.join(scratch, 'baseline'),
    ],
    f'limit (decode only, {CORES} processes)': [
      sys.executable,
      os.path.join(BENCH, 'limit.py'),
      data,
      str(CORES),
    ],
    'pipeline, DirectRunner in-process': pipeline_command(
      data, os.path.join(scratch, 'in-process'), ['--runner', 'DirectRunner']
    ),
    f'pipeline, DirectRunner {CORES} processes': pipeline_command(
      data,
      os.path.join(scratch, 'processes'),
      [
        '--runner',
        'DirectRunner',
        '--direct_running_mode=multi_processing',
        f'--direct_num_workers={CORES}',
      ],
    ),
  }


def fingerprint(out: str) -> list[tuple]:
  """Every row's identity and content hashes, sorted."""
  table = pq.read_table(
    os.path.join(out, 'slices'),
    columns=['patient_id', 'slice_index', 'image', 'i_mask', 'o_mask'],
  )
  digest = lambda b: hashlib.sha256(b).hexdigest() if b is not None else None  # noqa: E731
  return sorted(
    (
      r['patient_id'],
      r['slice_index'],
      digest(r['image']),
      digest(r['i_mask']),
      digest(r['o_mask']),
    )
    for r in table.to_pylist()
  )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--data', required=True, help='tree to benchmark (>= 20,000 slices)'
  )
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--memory-base', help='a 1x tree for the memory comparison')
  parser.add_argument('--memory-big', help='a 20x tree for the memory comparison')
  parser.add_argument('--write', help='also write the report to this Markdown file')
  args = parser.parse_args(argv)
  slices = count_slices(args.data)
  scratch = tempfile.mkdtemp(prefix='bench-')
  lines = []

  def say(text=''):
    print(text, flush=True)
    lines.append(text)

  results = {}
  for name, command in modes(args.data, scratch).items():
    runs = [measure(command) for _ in range(args.runs)]
    results[name] = (
      statistics.median(r[0] for r in runs),
      statistics.median(r[1] for r in runs),
      [round(r[0], 1) for r in runs],
    )
    print(f'  {name}: {results[name][2]} s', flush=True)
  baseline = slices / next(v[0] for k, v in results.items() if k.startswith('baseline'))
  limit = slices / next(v[0] for k, v in results.items() if k.startswith('limit'))
  say(
    f'{slices} slices, {args.runs} runs each, medians. Machine: {CORES} cores, '
    f'{psutil.virtual_memory().total / 2**30:.0f} GiB, '
    f'{platform.processor() or platform.machine()}, '
    f'Python {platform.python_version()}.'
  )
  say()
  say('| mode | slices/s | wall s | peak RSS MiB | x baseline | x limit | runs (s) |')
  say('| --- | ---: | ---: | ---: | ---: | ---: | --- |')
  for name, (seconds, rss, runs) in results.items():
    rate = slices / seconds
    say(
      f'| {name} | {rate:.0f} | {seconds:.1f} | {rss / 2**20:.0f} | '
      f'{rate / baseline:.2f} | {rate / limit:.2f} | {runs} |'
    )

  say()
  same = fingerprint(os.path.join(scratch, 'in-process')) == fingerprint(
    os.path.join(scratch, 'processes')
  )
  say(
    f'Output identical (rows, image and mask hashes) in-process and with {CORES} '
    f'worker processes: {"yes" if same else "NO"}.'
  )

  one = os.path.join(scratch, 'one-patient')
  sample.make_tree(one, patients=1, slices=230, rows=256, columns=256, contour_every=9)
  startup = statistics.median(
    measure(
      pipeline_command(one, os.path.join(scratch, 'o1'), ['--runner', 'DirectRunner'])
    )[0]
    for _ in range(args.runs)
  )
  say(f'Fixed cost: a 1-patient run (230 slices) takes {startup:.1f} s in-process.')
  if args.memory_base and args.memory_big:
    small, big = (
      statistics.median(
        measure(
          pipeline_command(
            tree, os.path.join(scratch, 'mem'), ['--runner', 'DirectRunner']
          )
        )[1]
        for _ in range(args.runs)
      )
      for tree in (args.memory_base, args.memory_big)
    )
    say(
      f'Peak RSS, pipeline in-process: {count_slices(args.memory_base)} slices '
      f'{small / 2**20:.0f} MiB; {count_slices(args.memory_big)} slices '
      f'{big / 2**20:.0f} MiB; ratio {big / small:.2f}.'
    )
  shutil.rmtree(scratch, ignore_errors=True)
  if args.write:
    with open(args.write, 'w') as f:
      f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
