"""Benchmark: the slices of a tree read from the tree, and from a PACS.

    python bench/pacs.py --data bench/data/x1 --runs 3

Starts Orthanc with its DICOMweb plugin (Debian's packages, as the tests do:
tests/orthanc.py) on 127.0.0.1, uploads the tree's slices once, then runs in
interleaved rounds:

- ``tree``: the pipeline on the local tree;
- ``pacs``: the same tree with ``--dicomweb-url`` (its dicoms/ ignored): the
  slices are searched and retrieved from Orthanc, a series a request (the
  default, ``--dicomweb-retrieve series``);
- ``pacs by instance``: the same with ``--dicomweb-retrieve instance``, a
  request per instance;
- ``tree, 1 patient`` and ``pacs, 1 patient``: the same with only the first
  link.csv row, to separate each mode's fixed cost (start-up, the pre-flight
  search, Beam's stages) from its rate: "past the fixed cost" is the slices
  the full tree adds over the time it adds;
- ``wado-rs alone``: one pooled urllib3 client retrieving every instance of
  the tree with WADO-RS, 32 at a time, doing nothing else: what Orthanc
  serves on this machine, the baseline of the target (a rate with no fixed
  cost, so it is compared with the pipeline's rate past its fixed cost);
- ``wado-rs series alone``: the same client retrieving every series whole
  (each answer read to its end), 32 at a time: the ceiling of the pipeline's
  own way of asking.

Prints medians of slices/s (instances/s for the baseline), wall and CPU
seconds of the pipeline's process tree and of Orthanc (they share the
machine), and the ratios, as medians of per-round ratios.
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
from concurrent.futures import ThreadPoolExecutor

import psutil
import urllib3
from run import (
  checkout,
  count_slices,
  first_patient,
  mark_past_fixed_cost,
  measure,
  pipeline_command,
  settle,
)

from beam_pipeline.dataset import read_summary  # noqa: E402
from tests import orthanc  # noqa: E402  (run puts the repo on the path)
from transforms.io import dicomweb

CONCURRENCY = 32


def pacs_tree(data: str, target: str) -> str:
  """A copy of ``data`` whose slices say which patient they belong to: the
  PatientID of each is its folder's name (the benchmark trees replicate real
  patients under new folder names), so a PACS matches them as the tree
  does. Its UIDs are derived from the folder too, so replicas stay distinct
  instances on the server."""
  import pydicom

  shutil.copytree(data, target, ignore=shutil.ignore_patterns('dicoms'))
  for folder in sorted(os.listdir(os.path.join(data, 'dicoms'))):
    os.makedirs(os.path.join(target, 'dicoms', folder))
    for name in os.listdir(os.path.join(data, 'dicoms', folder)):
      ds = pydicom.dcmread(os.path.join(data, 'dicoms', folder, name))
      ds.PatientID = folder
      for keyword in ('StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID'):
        uid = pydicom.uid.generate_uid(entropy_srcs=[folder, getattr(ds, keyword)])
        setattr(ds, keyword, uid)
      ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
      ds.save_as(os.path.join(target, 'dicoms', folder, name))
  return target


def upload(server: orthanc.Server, data: str) -> int:
  paths = [
    os.path.join(folder, name)
    for folder, _, names in os.walk(os.path.join(data, 'dicoms'))
    for name in names
    if name.endswith('.dcm')
  ]
  with ThreadPoolExecutor(8) as pool:
    stored = sum(pool.map(lambda p: orthanc.upload(server, p), paths))
  return stored


def instance_paths(server: orthanc.Server) -> list[str]:
  status, body = orthanc.request(server.root, 'GET', '/dicom-web/instances')
  assert status == 200, status
  return [dicomweb.instance_of(item).path for item in json.loads(body)]


def wado_alone(server: orthanc.Server, paths: list[str], instances: int) -> float:
  """Instances/s of one pooled client retrieving ``paths`` (instances or
  whole series, ``instances`` in all), 32 at a time."""
  pool = urllib3.PoolManager(maxsize=CONCURRENCY)
  headers = {
    'Authorization': orthanc.authorization(),
    'Accept': 'multipart/related; type="application/dicom"; transfer-syntax=*',
  }

  def get(path: str) -> int:
    response = pool.request('GET', f'{server.dicomweb}/{path}', headers=headers)
    assert response.status == 200, response.status
    return len(response.data)

  start = time.perf_counter()
  with ThreadPoolExecutor(CONCURRENCY) as threads:
    list(threads.map(get, paths))
  return instances / (time.perf_counter() - start)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='a local data tree')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--scratch', default=None)
  parser.add_argument(
    '--compare',
    action='append',
    default=[],
    metavar='LABEL=REF',
    help='also run the pacs and pacs by instance modes with another version '
    'of the pipeline in the same rounds (a git commit or a checkout folder)',
  )
  args = parser.parse_args(argv)
  reason = orthanc.missing()
  if reason is not None:
    sys.exit(f'Orthanc is needed: {reason}')
  scratch = tempfile.mkdtemp(prefix='pacs-', dir=args.scratch)
  others = {}
  for item in args.compare:
    label, _, ref = item.partition('=')
    if not ref:
      parser.error(f'--compare {item!r}: expected LABEL=REF')
    others[label] = checkout(ref, scratch)
  data = pacs_tree(args.data, os.path.join(scratch, 'DATA'))
  one = first_patient(data, os.path.join(scratch, 'ONE'))
  slices = {data: count_slices(data), one: count_slices(one)}
  out = os.path.join(scratch, 'out')
  results: dict[str, list[dict]] = {}
  env = dict(
    os.environ,
    **{dicomweb.ENV_USERNAME: orthanc.USER, dicomweb.ENV_PASSWORD: orthanc.PASSWORD},
  )
  with orthanc.started(os.path.join(scratch, 'orthanc')) as server:
    started = time.perf_counter()
    stored = upload(server, data)
    print(
      f'uploaded {stored} instances in {time.perf_counter() - started:.1f} s',
      file=sys.stderr,
    )
    paths = instance_paths(server)
    series = sorted({p.rpartition('/instances/')[0] for p in paths})
    process = psutil.Process(server.pid)

    def server_cpu() -> float:
      times = process.cpu_times()
      return times.user + times.system

    def pipeline(tree, extra, repo=None):
      def run():
        settle(out)
        command = pipeline_command(tree, out, extra, **({'repo': repo} if repo else {}))
        m = measure(command, env=env)
        written = read_summary(out)['counters']['slices_written']
        assert written == slices[tree], f'{written} of {slices[tree]} slices written'
        return {'rate': written / m.seconds, 'seconds': m.seconds, 'cpu': m.cpu}

      return run

    pacs = ['--dicomweb-url', server.dicomweb]
    by_instance = [*pacs, '--dicomweb-retrieve', 'instance']
    modes = {
      'tree': pipeline(data, []),
      'pacs': pipeline(data, pacs),
      'pacs by instance': pipeline(data, by_instance),
      'tree, 1 patient': pipeline(one, []),
      'pacs, 1 patient': pipeline(one, pacs),
      'pacs by instance, 1 patient': pipeline(one, by_instance),
      **{
        f'{name} ({label})': pipeline(data, extra, repo)
        for label, repo in others.items()
        for name, extra in (('pacs', pacs), ('pacs by instance', by_instance))
      },
      'wado-rs alone': lambda: {'rate': wado_alone(server, paths, len(paths))},
      'wado-rs series alone': lambda: {'rate': wado_alone(server, series, len(paths))},
    }
    for round_ in range(args.runs):
      order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
      for name in order:
        before = server_cpu()
        row = modes[name]()
        row['server cpu'] = server_cpu() - before
        results.setdefault(name, []).append(row)
        print(f'round {round_ + 1} {name}: {row}', file=sys.stderr)
  shutil.rmtree(scratch, ignore_errors=True)

  def median(name, key):
    values = [r[key] for r in results[name] if key in r]
    return statistics.median(values) if values else None

  added = slices[data] - slices[one]
  for name in ('tree', 'pacs', 'pacs by instance'):
    mark_past_fixed_cost(results[name], results[f'{name}, 1 patient'], added)

  def ratio(a: str, b: str, key: str = 'rate', key_b: str = 'rate') -> str:
    pairs = zip(results[a], results[b], strict=True)
    rounds = [x[key] / y[key_b] for x, y in pairs]
    shown = ', '.join(f'{r:.2f}' for r in rounds)
    return f'{statistics.median(rounds):.2f}x (per round: {shown})'

  print(
    f"\n{slices[data]} slices ({slices[one]} of them the first patient's), "
    f'{len(paths)} instances on Orthanc, {args.runs} rounds (medians)\n'
  )
  print('| mode | slices/s | past the fixed cost | wall s | CPU s | Orthanc CPU s |')
  print('| --- | --- | --- | --- | --- | --- |')
  for name in modes:
    keys = ('rate', 'marginal', 'seconds', 'cpu', 'server cpu')
    shown = ['' if c is None else f'{c:.1f}' for c in (median(name, k) for k in keys)]
    unit = ' (instances/s)' if name.startswith('wado-rs') else ''
    print(f'| {name} | {shown[0]}{unit} | {" | ".join(shown[1:])} |')
  print()
  print(
    f'- pacs / tree: {ratio("pacs", "tree")}; past the fixed cost: '
    f'{ratio("pacs", "tree", "marginal", "marginal")}'
  )
  for name in ('pacs', 'pacs by instance'):
    print(
      f'- {name} / wado-rs alone, past the fixed cost: '
      f'{ratio(name, "wado-rs alone", "marginal")} (target >= 0.5); end to end: '
      f'{ratio(name, "wado-rs alone")}'
    )
  print(
    f'- pacs / wado-rs series alone, past the fixed cost: '
    f'{ratio("pacs", "wado-rs series alone", "marginal")}; end to end: '
    f'{ratio("pacs", "wado-rs series alone")}'
  )
  print(
    f'- pacs / pacs by instance: {ratio("pacs", "pacs by instance")}; past the '
    f'fixed cost: {ratio("pacs", "pacs by instance", "marginal", "marginal")}'
  )
  for label in others:
    for name in ('pacs', 'pacs by instance'):
      print(
        f'- {name}, wall time of this version / {label}: '
        f'{ratio(name, f"{name} ({label})", "seconds", "seconds")}'
      )


if __name__ == '__main__':
  main()
