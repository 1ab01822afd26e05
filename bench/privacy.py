"""Benchmark: what pseudonymisation costs.

    python bench/privacy.py --data bench/data/x10 --runs 5

Runs the pipeline on one tree in interleaved rounds (every other round in
reverse order, each from the same state), in the mode it picks for itself:

- ``plain``: no key;
- ``keyed``: ``--pseudonymize-key-file`` (ids, UIDs and paths replaced);
- ``keyed + id map``: and ``--id-map`` (every replaced value collected,
  made distinct across the job and written beside the output).

Prints medians of slices/s, wall and CPU seconds of the process tree and peak
RSS, and each mode's speed and CPU against ``plain`` as medians of per-round
ratios (speed above 1 is faster, CPU above 1 costs more).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from run import count_slices, measure, pipeline_command, settle

MODES = ('plain', 'keyed', 'keyed + id map')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='tree to benchmark')
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args(argv)
  data = os.path.abspath(args.data)
  slices = count_slices(data)
  scratch = tempfile.mkdtemp(prefix='bench-privacy-')
  key = os.path.join(scratch, 'key')
  with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o600), 'wb') as f:
    f.write(os.urandom(32))
  out, id_map = os.path.join(scratch, 'out'), os.path.join(scratch, 'map.csv')
  extra = {
    'plain': [],
    'keyed': ['--pseudonymize-key-file', key],
    'keyed + id map': ['--pseudonymize-key-file', key, '--id-map', id_map],
  }
  results = {mode: [] for mode in MODES}
  for k in range(args.runs):
    for mode in MODES if k % 2 == 0 else reversed(MODES):
      settle(out)
      if os.path.exists(id_map):
        os.remove(id_map)
      results[mode].append(measure(pipeline_command(data, out, extra[mode])))
  print(f'{slices} slices, {args.runs} interleaved rounds, medians:\n')
  header = ('mode', 'slices/s', 'wall s', 'CPU s', 'peak RSS MiB', 'speed', 'CPU')
  print('| ' + ' | '.join(header) + ' |')
  print('| --- ' * len(header) + '|')
  for mode in MODES:
    rows = results[mode]
    wall = statistics.median(r.seconds for r in rows)
    cpu = statistics.median(r.cpu for r in rows)
    peak = statistics.median(r.peak for r in rows) / 2**20
    speed = statistics.median(
      p.seconds / r.seconds for p, r in zip(results['plain'], rows, strict=True)
    )
    cost = statistics.median(
      r.cpu / p.cpu for p, r in zip(results['plain'], rows, strict=True)
    )
    print(
      f'| {mode} | {slices / wall:,.0f} | {wall:.2f} | {cpu:.2f} | {peak:,.0f} | '
      f'{speed:.2f}x | {cost:.2f}x |'
    )
  print('\nwall per run (s):')
  for mode in MODES:
    print(f'  {mode}: ' + ', '.join(f'{r.seconds:.2f}' for r in results[mode]))


if __name__ == '__main__':
  main()
