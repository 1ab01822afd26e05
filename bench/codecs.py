"""Benchmark: the image column's codec, judged from both sides.

    python bench/codecs.py --data bench/data/x20d --runs 3

For each ``--image-codec`` (none, lz4, snappy, zstd), in interleaved rounds
with the baseline script (bench/baseline.py, zstd for every column): the
pipeline writes the tree in the mode it picks for itself (wall and CPU
seconds of the whole process tree), the output's size is set against the
baseline's, and the dataset is read back with ``iter_batches`` on one core
from the page cache (bench/reads.py's reader: labeled slices, then every
slice). Prints medians; ratios are medians of per-round ratios against the
codec ``none`` (the default). Issue 16 asks for a default output no larger
than the baseline's (target 3) and 5,000 labeled slices/s on one core
(target 5).
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

from reads import _READER
from run import REPO, measure, pipeline_command, settle, size_of

CODECS = ('none', 'lz4', 'snappy', 'zstd')


def _read(out: str) -> dict:
  done = subprocess.run(
    [sys.executable, '-c', _READER, out], cwd=REPO, capture_output=True, check=True
  )
  return json.loads(done.stdout)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='tree to write and read')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--codecs', default=','.join(CODECS))
  args = parser.parse_args(argv)
  data = os.path.abspath(args.data)
  codecs = args.codecs.split(',')
  scratch = tempfile.mkdtemp(prefix='bench-codecs-')
  out = os.path.join(scratch, 'out')
  runs = {name: [] for name in ['baseline', *codecs]}
  for k in range(args.runs):
    order = ['baseline', *codecs]
    for name in order if k % 2 == 0 else reversed(order):
      settle(out)
      if name == 'baseline':
        command = [
          sys.executable,
          os.path.join(REPO, 'bench', 'baseline.py'),
          data,
          out,
        ]
        got = measure(command)
        runs[name].append({'wall': got.seconds, 'cpu': got.cpu, 'bytes': size_of(out)})
        continue
      got = measure(pipeline_command(data, out, ['--image-codec', name]))
      runs[name].append(
        {'wall': got.seconds, 'cpu': got.cpu, 'bytes': size_of(out), **_read(out)}
      )
  shutil.rmtree(scratch, ignore_errors=True)
  _report(args, runs, codecs)


def _median(rows: list[dict], key: str) -> float:
  return statistics.median(r[key] for r in rows)


def _ratio(rows: list[dict], base: list[dict], key: str) -> float:
  return statistics.median(r[key] / b[key] for r, b in zip(rows, base, strict=True))


def _report(args, runs: dict, codecs: list[str]) -> None:
  base = runs['baseline']
  none = runs.get('none')
  print(f'{args.data}: image codecs, {args.runs} interleaved rounds, medians\n')
  print(
    '| writer | output MiB | size vs baseline | write wall s | write CPU s '
    '| CPU vs none | labeled reads/s | all reads/s | labeled reads vs none |'
  )
  print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
  mib = 1 << 20
  print(
    f'| baseline script (zstd) | {_median(base, "bytes") / mib:,.0f} | 1.000 '
    f'| {_median(base, "wall"):.1f} | {_median(base, "cpu"):.1f} | - | - | - | - |'
  )
  for name in codecs:
    rows = runs[name]
    cells = [
      f'{_median(rows, "bytes") / mib:,.0f}',
      f'{_ratio(rows, base, "bytes"):.3f}',
      f'{_median(rows, "wall"):.1f}',
      f'{_median(rows, "cpu"):.1f}',
      f'{_ratio(rows, none, "cpu"):.2f}x' if none else '-',
      f'{_median(rows, "labeled"):,.0f}',
      f'{_median(rows, "all"):,.0f}',
      f'{_ratio(rows, none, "labeled"):.2f}x' if none else '-',
    ]
    print(f'| pipeline, --image-codec {name} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
