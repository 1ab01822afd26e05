"""Where worker processes start to pay off: the DirectRunner in-process
against one worker process per core, and the mode the pipeline picks itself.

    python bench/crossover.py bench/data/x1 bench/data/x10 bench/data/x20 --runs 3

For each tree, in interleaved rounds (every other one in reverse order), runs
the pipeline in-process, with one worker process per core, and with no mode
option (the pipeline's own choice, beam_pipeline.launch.preflight), and prints the
median wall seconds, the ratio in-process / processes (above 1: processes
win) and what the pipeline chose. The figures check the crossover the
pipeline computes from its rate constants.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from run import CORES, REPO, count_slices, measure, pipeline_command, settle

sys.path.insert(0, REPO)
from beam_pipeline.launch import preflight

MODES = {
  'in-process': ['--direct_running_mode=in_memory'],
  'processes': [
    '--direct_running_mode=multi_processing',
    f'--direct_num_workers={CORES}',
  ],
  'chosen': [],
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('trees', nargs='+')
  parser.add_argument('--runs', type=int, default=3)
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix='crossover-')
  out = os.path.join(scratch, 'OUT')
  workers = min(CORES, preflight.MAX_WORKERS)
  print(
    f"{CORES} cores; the pipeline's crossover for {workers} workers: "
    f'{preflight.crossover(workers):,.0f} slices\n'
  )
  print(
    '| slices | in-process s | processes s | in-process / processes '
    '| chosen s | chosen |'
  )
  print('| ---: | ---: | ---: | ---: | ---: | --- |')
  for tree in args.trees:
    slices = count_slices(tree)
    times = {mode: [] for mode in MODES}
    for n in range(args.runs):
      order = list(MODES) if n % 2 == 0 else list(reversed(MODES))
      for mode in order:
        settle(out)
        times[mode].append(measure(pipeline_command(tree, out, MODES[mode])).seconds)
    found = preflight.survey(tree)
    chosen = preflight.choose_direct_mode(found, preflight.cores())
    median = {mode: statistics.median(t) for mode, t in times.items()}
    print(
      f'| {slices:,} | {median["in-process"]:.1f} | {median["processes"]:.1f} | '
      f'{median["in-process"] / median["processes"]:.2f} | {median["chosen"]:.1f} | '
      f'{chosen.describe().split(" (")[0]} |'
    )
  settle(out)
  os.rmdir(scratch)


if __name__ == '__main__':
  main()
