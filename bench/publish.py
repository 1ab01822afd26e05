"""Benchmark: what the publish (the Delta commits) of a run costs.

    python bench/publish.py --data bench/data/x20 [--runs 3]

Runs the pipeline once into a scratch output (version 0), then once more
with the publish held back (its arguments kept, the staged files left in
place), and times ``publish.publish`` alone on fresh copies of that state:
moving the staged files, the three commits, finding the versions made.
Prints the file count and the median seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_pipeline.launch import cli, publish, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='a data tree')
  parser.add_argument('--runs', type=int, default=3)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix='bench-publish-') as scratch:
    out = os.path.join(scratch, 'OUT')
    assert cli.main(['--input', args.data, '--output', out]) in (0, 3)
    kept = {}
    real = run.publish.publish

    def keep(output, run_id, files, record, start, kept_files=None, removed=None):
      kept.update(output=output, run_id=run_id, files=files, record=record)
      kept.update(start=start, kept=kept_files, removed=removed)
      return -1

    run.publish.publish = keep
    try:
      # --full: a whole new version to publish, not an incremental no-op
      assert cli.main(['--input', args.data, '--output', out, '--full']) in (0, 3)
    finally:
      run.publish.publish = real
    seconds = []
    for k in range(args.runs):
      copy = os.path.join(scratch, f'copy-{k}')
      shutil.copytree(out, copy)
      moved = json.loads(json.dumps(kept).replace(out, copy))
      start = time.perf_counter()
      publish.publish(**moved)
      seconds.append(time.perf_counter() - start)
    print(
      f'{len(kept["files"])} files; publish {statistics.median(seconds) * 1000:.0f} ms '
      f'(median of {args.runs}: {", ".join(f"{s * 1000:.0f}" for s in seconds)})'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
