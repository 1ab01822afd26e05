"""Benchmark: training reads, iter_batches on one core from the page cache.

    python bench/reads.py --data bench/data/x20 --runs 5 --compare before=HEAD~1
    python bench/reads.py --data bench/data/x20 --runs 5 --image-codec none

Writes the dataset of ``--data`` once with this checkout (and once with each
``--compare LABEL=REF`` version, a git commit or a checkout folder), then, in
interleaved rounds, reads it back in a process of its own pinned to one core
with that version's ``iter_batches`` (batches of 32, one epoch, every column):
the labeled slices (``labeled_only=True``, what a segmentation model trains
on), then every slice. Each process first reads once to warm the page cache
and the shard digests, so the figures are reads from memory, as in the
epochs of a training run after the first. Prints medians of slices/s and, per
version, the ratio against this checkout (medians of per-round ratios).
The target of issue 16: 5,000 labeled slices/s or more on one core.
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

from run import REPO, checkout, pipeline_command

_READER = """
import gc, json, os, sys, time
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from beam_pipeline.dataset import iter_batches
out = sys.argv[1]
def read(labeled):
  n = 0
  for batch in iter_batches(out, 32, seed=3, labeled_only=labeled):
    n += len(batch['slice_index'])
  return n
def view():  # the training view of issue 33, where the version has it
  n = 0
  try:
    batches = iter_batches(out, 32, seed=3, labeled_only=True, float_image=True,
                           label_map=True, geometry=True)
    for batch in batches:
      n += len(batch['slice_index'])
  except TypeError:
    return None
  return n
try:  # imported before any timing (torch, and MONAI where installed)
  from beam_pipeline.dataset.torch_data import SliceDataset
except ImportError:
  SliceDataset = None
def items():  # the PyTorch adapter's items, one by one
  if SliceDataset is None:
    return None
  return sum(1 for _ in SliceDataset(out, seed=3, labeled_only=True))
def lean():  # the adapter's items of before issue 33: image and masks only
  if SliceDataset is None:
    return None
  try:
    ds = SliceDataset(out, seed=3, labeled_only=True, rescale=False,
                      label_map=False, geometry=False, meta_tensors=False)
  except TypeError:
    ds = SliceDataset(out, seed=3, labeled_only=True)
  return sum(1 for _ in ds)
read(False)  # the page cache and the shard digests
items()  # the adapter's own first use
rates = {}
for name, run in (('labeled', lambda: read(True)), ('all', lambda: read(False)),
                  ('view', view), ('torch', items), ('lean', lean)):
  gc.collect()  # none of the warm-ups' garbage in the timed read
  start = time.perf_counter()
  n = run()
  if n is not None:
    rates[name] = n / (time.perf_counter() - start)
print(json.dumps(rates))
"""

_KINDS = {
  'labeled': 'labeled slices/s',
  'all': 'all slices/s',
  'view': 'labeled, float + label map + affine',
  'torch': 'SliceDataset items/s (labeled)',
  'lean': 'SliceDataset, image and masks only',
}


def _env(repo: str) -> dict:
  return {**os.environ, 'PYTHONPATH': repo}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='tree to write and read')
  parser.add_argument('--runs', type=int, default=5)
  parser.add_argument('--compare', action='append', default=[], metavar='LABEL=REF')
  parser.add_argument(
    '--image-codec', help="the pipeline's --image-codec (default: its default)"
  )
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix='bench-reads-')
  versions = {'this': REPO}
  for item in args.compare:
    label, _, ref = item.partition('=')
    versions[label] = checkout(ref, scratch)
  outs = {}
  for label, repo in versions.items():
    outs[label] = os.path.join(scratch, f'out-{label}')
    extra = ['--image-codec', args.image_codec] if args.image_codec else []
    command = pipeline_command(os.path.abspath(args.data), outs[label], extra, repo)
    done = subprocess.run(command, env=_env(repo), cwd=repo, capture_output=True)
    if done.returncode not in (0, 3):
      sys.exit(f'{label}: the pipeline failed:\n{done.stderr.decode()[-2000:]}')
  rates = {label: [] for label in versions}
  for k in range(args.runs):
    order = list(versions) if k % 2 == 0 else list(reversed(versions))
    for label in order:
      repo = versions[label]
      done = subprocess.run(
        [sys.executable, '-c', _READER, outs[label]],
        env=_env(repo),
        cwd=repo,
        capture_output=True,
        check=True,
      )
      rates[label].append(json.loads(done.stdout))
  codec = args.image_codec or 'default'
  print(
    f'{args.data}: iter_batches on one core, image codec {codec}, '
    f'{args.runs} interleaved rounds\n'
  )
  kinds = [k for k in _KINDS if k in rates['this'][0]]
  print('| version | ' + ' | '.join(_KINDS[k] for k in kinds) + ' |')
  print('| --- |' + ' --- |' * len(kinds))
  for label in versions:
    got = rates[label]
    cells = []
    for kind in kinds:
      if kind not in got[0]:
        cells.append('-')
        continue
      ratio = statistics.median(
        r[kind] / t[kind] for r, t in zip(got, rates['this'], strict=True)
      )
      median = statistics.median(r[kind] for r in got)
      cells.append(f'{median:,.0f} ({ratio:.2f}x this)')
    print(f'| {label} | ' + ' | '.join(cells) + ' |')
  shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
