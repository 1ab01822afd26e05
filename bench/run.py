"""Benchmark: the pipeline against a plain script and a decode-only limit.

    python bench/run.py --data bench/data/x100 --runs 3 [--write BENCHMARKS.md]
    python bench/run.py --data bench/data/x20 --runs 3 --compare before=HEAD~1

Runs, on the same tree and in one invocation: the baseline (bench/baseline.py,
sequential), the limit (bench/limit.py: decode only, one process per core) and
the pipeline (run_pipeline.py) in-process and with one worker process per
core. Runs are interleaved (round 1 of every mode, then round 2, ...; every
other round in reverse order), each from the same state: previous output
deleted, dirty pages synced, a short pause. Prints one table of medians:
slices/s, wall seconds, CPU seconds, peak RSS of the whole process tree,
output size, and the ratios against the baseline and the
limit (also per round, as machine load moves every figure). Also: the
pipeline's fixed cost (a 1-patient tree), its peak RSS on a 1x and a 20x tree
(--memory-base, --memory-big), whether its output is the same whatever the
number of workers, and what writing new files costs on this machine.

``--compare LABEL=REF`` runs another version (a git commit, unpacked into the
scratch folder, or a folder holding a checkout) in both pipeline modes in the
same interleaved rounds, and prints this version's speed against it: how a
change is shown not to slow the pipeline down on a noisy machine.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import psutil
import pyarrow.parquet as pq

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)
CORES = os.cpu_count() or 1
PAUSE = 2.0  # seconds between runs

from beam_pipeline.tools import sample  # noqa: E402


class Measured(NamedTuple):
  seconds: float  # wall
  peak: int  # peak RSS of the whole process tree, bytes
  cpu: float  # user + system CPU seconds of the process and the descendants
  # it waited for (the runner's worker processes)


def measure(
  command: list[str], env: dict | None = None, cwd: str | None = None
) -> Measured:
  """Runs ``command``; returns its wall time, peak RSS and CPU time."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  process = psutil.Popen(
    command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd
  )
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
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
  return Measured(seconds, peak, cpu)


def settle(*paths: str) -> None:
  """The same starting state for every run: outputs gone, disk synced, a pause."""
  for path in paths:
    shutil.rmtree(path, ignore_errors=True)
  os.sync()
  time.sleep(PAUSE)


def size_of(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(d, name))
    for d, _, files in os.walk(path)
    for name in files
  )


def write_cost(scratch: str, mib: int = 1024) -> float:
  """CPU seconds per MiB this process spends writing a new file of ``mib`` MiB."""
  block = os.urandom(1 << 20)
  path = os.path.join(scratch, 'write-probe')
  settle()
  before = psutil.Process().cpu_times()
  with open(path, 'wb') as f:
    for _ in range(mib):
      f.write(block)
  after = psutil.Process().cpu_times()
  os.remove(path)
  return (after.user + after.system - before.user - before.system) / mib


def count_slices(data: str) -> int:
  return sum(
    1
    for _, _, files in os.walk(os.path.join(data, 'dicoms'))
    for name in files
    if name.endswith('.dcm')
  )


def first_patient(data: str, target: str) -> str:
  """A tree of ``data``'s first link.csv row only (its slices and contours)."""
  with open(os.path.join(data, 'link.csv')) as f:
    header, first = f.read().splitlines()[:2]
  patient, original = first.split(',')
  os.makedirs(target)
  with open(os.path.join(target, 'link.csv'), 'w') as f:
    f.write(f'{header}\n{first}\n')
  for top, name in (('dicoms', patient), ('contourfiles', original)):
    shutil.copytree(os.path.join(data, top, name), os.path.join(target, top, name))
  return target


def mark_past_fixed_cost(full: list[dict], small: list[dict], added: int) -> None:
  """Sets each full run's ``marginal``: the ``added`` items (slices or
  objects) the full tree holds over the 1-patient tree (first_patient),
  over the seconds they add in the same round; the fixed cost both pay
  drops out."""
  for big, one in zip(full, small, strict=True):
    big['marginal'] = added / (big['seconds'] - one['seconds'])


def pipeline_command(
  data: str, out: str, extra: list[str], repo: str = REPO
) -> list[str]:
  return [
    sys.executable,
    os.path.join(repo, 'run_pipeline.py'),
    '--input',
    data,
    '--output',
    out,
    '--overwrite',
    *extra,
  ]


def checkout(ref: str, scratch: str) -> str:
  """A folder holding ``ref``: the folder itself, or the git commit unpacked."""
  if os.path.isdir(ref):
    return os.path.abspath(ref)
  target = os.path.join(
    scratch, 'ref-' + ''.join(c if c.isalnum() else '_' for c in ref)
  )
  os.makedirs(target)
  archive = subprocess.run(
    ['git', '-C', REPO, 'archive', ref], check=True, capture_output=True
  ).stdout
  subprocess.run(['tar', '-x', '-C', target], input=archive, check=True)
  return target


class Mode(NamedTuple):
  command: list[str]
  out: str | None  # the folder it writes, if any
  env: dict | None = None
  cwd: str | None = None

  def measure(self) -> Measured:
    return measure(self.command, self.env, self.cwd)


def _in(repo: str, tweaks_off: str = '') -> dict:
  """Where and how a pipeline version runs so that every process, its worker
  processes too (``python -m`` puts the working folder first), imports it."""
  env = {**os.environ, TWEAKS_OFF: tweaks_off}
  if repo != REPO:
    env['PYTHONPATH'] = repo
  return {'env': env, 'cwd': repo}


# transforms/tuning.py's benchmark knob (read in every process of a run).
TWEAKS_OFF = 'CARDIAC_MRI_TWEAKS_OFF'
TWEAKS = ('malloc', 'direct', 'arenas')


class Variant(NamedTuple):
  """Another pipeline to run in the same rounds: a version, or this one with
  process-wide tweaks left off (transforms/tuning.py's benchmark knob)."""

  repo: str
  tweaks_off: str = ''


def modes(
  data: str, scratch: str, variants: dict[str, Variant] | None = None
) -> dict[str, Mode]:
  """Each mode's command, the folder it writes (None: writes nothing) and its
  environment; ``variants`` adds both pipeline modes of each variant."""
  out = {
    name: os.path.join(scratch, name)
    for name in ('baseline', 'in-process', 'processes')
  }
  found = {
    'baseline (sequential script)': Mode(
      [sys.executable, os.path.join(BENCH, 'baseline.py'), data, out['baseline']],
      out['baseline'],
    ),
    f'limit (decode only, {CORES} processes)': Mode(
      [sys.executable, os.path.join(BENCH, 'limit.py'), data, str(CORES)], None
    ),
  }
  for label, variant in {'': Variant(REPO), **(variants or {})}.items():
    at = f' @{label}' if label else ''
    for mode, extra, name in (
      ('in-process', IN_PROCESS, 'in-process'),
      (f'{CORES} processes', PROCESSES, 'processes'),
    ):
      folder = os.path.join(scratch, f'{name}{label}')
      found[f'pipeline{at}, DirectRunner {mode}'] = Mode(
        pipeline_command(data, folder, extra, variant.repo),
        folder,
        **_in(variant.repo, variant.tweaks_off),
      )
  return found


# Explicit: without a mode option the pipeline picks one itself from the
# slice count (beam_pipeline/preflight.py), which is not what a row names.
IN_PROCESS = ['--runner', 'DirectRunner', '--direct_running_mode=in_memory']
PROCESSES = [
  '--runner',
  'DirectRunner',
  '--direct_running_mode=multi_processing',
  f'--direct_num_workers={CORES}',
]


def fingerprint(out: str) -> list[tuple]:
  """Every row's identity and content hashes, sorted; reads batch by batch."""
  digest = lambda b: hashlib.sha256(b).hexdigest() if b is not None else None  # noqa: E731
  rows = []
  for shard in sorted(glob.glob(os.path.join(out, 'slices', '*.parquet'))):
    columns = ['patient_id', 'slice_index', 'image', 'i_mask', 'o_mask']
    for batch in pq.ParquetFile(shard).iter_batches(batch_size=256, columns=columns):
      for r in batch.to_pylist():
        rows.append(
          (
            r['patient_id'],
            r['slice_index'],
            digest(r['image']),
            digest(r['i_mask']),
            digest(r['o_mask']),
          )
        )
  return sorted(rows)


def _table(
  data: str, runs_per_mode: int, scratch: str, say, variants: dict[str, Variant]
) -> None:
  """The main table: every mode, interleaved rounds, medians and ratios."""
  slices = count_slices(data)
  all_modes = modes(data, scratch, variants)
  outs = [mode.out for mode in all_modes.values() if mode.out]
  runs = {name: [] for name in all_modes}
  sizes, prints = {}, {}
  for round_ in range(runs_per_mode):
    # ABBA order: every other round runs the modes backwards, so no mode
    # always follows the same one (a run's cost depends on what ran before).
    order = list(all_modes.items())
    for name, mode in order if round_ % 2 == 0 else order[::-1]:
      settle(*outs)
      runs[name].append(mode.measure())
      out = mode.out
      if out and round_ == 0:
        sizes[name] = size_of(out)
        if name.startswith('pipeline'):
          prints[name] = fingerprint(out)
      print(f'  round {round_ + 1}: {name}: {runs[name][-1][0]:.1f} s', flush=True)
  settle(*outs)
  seconds = {name: [r[0] for r in measured] for name, measured in runs.items()}
  baseline_name = next(n for n in all_modes if n.startswith('baseline'))
  limit_name = next(n for n in all_modes if n.startswith('limit'))

  def ratios(name: str, against: str) -> list[float]:
    return [b / a for a, b in zip(seconds[name], seconds[against], strict=True)]

  say(
    f'{slices} slices, {runs_per_mode} interleaved rounds, medians. Machine: {CORES} '
    f'cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, '
    f'{platform.processor() or platform.machine()}, '
    f'Python {platform.python_version()}.'
  )
  say()
  say(
    '| mode | slices/s | wall s | CPU s | peak RSS MiB | output MiB | x baseline '
    '| x limit | runs (s) |'
  )
  say('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |')
  for name, measured in runs.items():
    wall = statistics.median(seconds[name])
    cpu = statistics.median(r.cpu for r in measured)
    rss = statistics.median(r.peak for r in measured)
    size = f'{sizes[name] / 2**20:.0f}' if name in sizes else '-'
    say(
      f'| {name} | {slices / wall:.0f} | {wall:.1f} | {cpu:.1f} | {rss / 2**20:.0f} '
      f'| {size} | '
      f'{statistics.median(ratios(name, baseline_name)):.2f} | '
      f'{statistics.median(ratios(name, limit_name)):.2f} | '
      f'{[round(x, 1) for x in seconds[name]]} |'
    )
  say()
  say(
    'x baseline and x limit are medians of the per-round ratios (each round '
    'runs every mode back to back).'
  )
  pipelines = [n for n in prints]
  same = all(prints[n] == prints[pipelines[0]] for n in pipelines)
  say(
    f'Output identical (rows, image and mask hashes) in every pipeline mode'
    f'{" and variant" if variants else ""}: {"yes" if same else "NO"}.'
  )
  cpus = {name: [r.cpu for r in measured] for name, measured in runs.items()}
  for label in variants:
    for mode in ('in-process', f'{CORES} processes'):
      this, other = (
        f'pipeline, DirectRunner {mode}',
        f'pipeline @{label}, DirectRunner {mode}',
      )
      cpu_ratio = statistics.median(
        b / a for a, b in zip(cpus[this], cpus[other], strict=True)
      )
      say(
        f'This version against @{label}, {mode}: '
        f'{statistics.median(ratios(this, other)):.2f}x the speed, '
        f'{cpu_ratio:.2f}x less CPU (medians of per-round ratios; above 1 is '
        'better).'
      )


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', help='tree to benchmark (>= 20,000 slices)')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--memory-base', help='a 1x tree for the memory comparison')
  parser.add_argument('--memory-big', help='a 20x tree for the memory comparison')
  parser.add_argument(
    '--memory-hot',
    help='a tree of one big patient (make_dataset.py --one-patient 5000), '
    'compared with --memory-base',
  )
  parser.add_argument(
    '--compare',
    action='append',
    default=[],
    metavar='LABEL=REF',
    help='also run another version of the pipeline in the same rounds: a git '
    'commit (e.g. before=HEAD~1) or a folder holding a checkout; repeatable',
  )
  parser.add_argument(
    '--tweaks',
    action='store_true',
    help='also run this version with each process-wide tweak left off '
    f'({", ".join(TWEAKS)}; see transforms/tuning.py), in the same rounds',
  )
  parser.add_argument('--write', help='also write the report to this Markdown file')
  parser.add_argument(
    '--scratch', help='where outputs go (default: a new folder in the temp dir)'
  )
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix='bench-', dir=args.scratch)
  lines = []

  def say(text=''):
    print(text, flush=True)
    lines.append(text)

  variants = {}
  for item in args.compare:
    label, _, ref = item.partition('=')
    if not ref:
      parser.error(f'--compare {item!r}: expected LABEL=REF')
    variants[label] = Variant(checkout(ref, scratch))
  if args.tweaks:
    variants.update({f'no-{name}': Variant(REPO, name) for name in TWEAKS})
  if args.data:
    _table(os.path.abspath(args.data), args.runs, scratch, say, variants)
  _extras(args, scratch, say)
  shutil.rmtree(scratch, ignore_errors=True)
  if args.write:
    with open(args.write, 'w') as f:
      f.write('\n'.join(lines) + '\n')


def _pipeline_runs(
  tree: str, extra: list[str], runs: int, scratch: str
) -> list[tuple[float, int]]:
  """(wall seconds, peak RSS) of ``runs`` pipeline runs on ``tree``, each settled."""
  out = os.path.join(scratch, 'extra-out')
  measured = []
  for _ in range(runs):
    settle(out)
    measured.append(measure(pipeline_command(tree, out, extra)))
  return measured


def _peak(tree: str, extra: list[str], runs: int, scratch: str) -> float:
  """Median peak RSS of the pipeline's process tree on ``tree``."""
  return statistics.median(r[1] for r in _pipeline_runs(tree, extra, runs, scratch))


def _extras(args, scratch: str, say) -> None:
  """Fixed cost, write cost and the memory comparisons."""
  one = os.path.join(scratch, 'one-patient')
  sample.make_tree(one, patients=1, slices=230, rows=256, columns=256, contour_every=9)
  fixed = {
    label: statistics.median(
      r[0] for r in _pipeline_runs(one, extra, args.runs, scratch)
    )
    for label, extra in (('in-process', IN_PROCESS), (f'{CORES} processes', PROCESSES))
  }
  say(
    'Fixed cost, a 1-patient run (230 slices): '
    + ', '.join(f'{seconds:.1f} s {label}' for label, seconds in fixed.items())
    + '.'
  )
  say(
    f'Writing a new 1 GiB file here costs {write_cost(scratch) * 1000:.2f} ms of '
    'CPU per MiB (page cache, kernel time included).'
  )
  for label, extra in (('in-process', IN_PROCESS), (f'{CORES} processes', PROCESSES)):
    if not args.memory_base:
      break
    small = _peak(args.memory_base, extra, args.runs, scratch)
    base = f'{count_slices(args.memory_base)} slices {small / 2**20:.0f} MiB'
    if args.memory_big:
      big = _peak(args.memory_big, extra, args.runs, scratch)
      say(
        f'Peak RSS, pipeline {label}: {base}; {count_slices(args.memory_big)} '
        f'slices {big / 2**20:.0f} MiB; ratio {big / small:.2f}.'
      )
    if args.memory_hot:
      hot = _peak(args.memory_hot, extra, args.runs, scratch)
      say(
        f'Peak RSS, pipeline {label}: {base}; one patient of '
        f'{count_slices(args.memory_hot)} slices {hot / 2**20:.0f} MiB; ratio '
        f'{hot / small:.2f}.'
      )


if __name__ == '__main__':
  main()
