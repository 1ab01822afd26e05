"""Benchmark: the same tree read locally, from S3, and from S3 behind latency.

    python bench/remote.py --data bench/data/x1 --runs 3

Starts an S3-compatible server and two proxies (tests/proxy.py) on
127.0.0.1, uploads the tree once, then runs in interleaved rounds. The
server is moto's S3 with keep-alive connections (tests/s3server.py), or
with ``--server moto_server`` moto's own development server, which closes
every connection and costs about twice the CPU per request. The modes:

- ``local``: ``--input`` on the local disk;
- ``s3``: ``--input s3://...`` straight to the server;
- ``s3 via proxy``: through a proxy adding nothing (it counts requests and
  the mean number in flight);
- ``s3 +30 ms``: through a proxy holding every request 30 ms, like a cloud
  store's time to first byte;
- ``s3 in and out``: ``--output`` on the server too;
- ``s3, 1 patient``: ``s3`` on the tree's first link.csv row only, to
  separate the run's fixed cost (start-up, graph, listing) from its rate:
  "past the fixed cost" is the objects the full tree adds over the time it
  adds, the figure to set against ``boto3 alone`` (a rate with no start-up);
- ``boto3 alone``: one client fetching every object of the tree
  sequentially (what the server gives one plain reader);
- ``server ceiling``: the pipeline's own reader (transforms.io.stores) fetching
  every object, 32 at a time, doing nothing else: the most this server
  serves on this machine, whatever the client.

The output is local except in the last pipeline mode. Prints medians of
slices/s (objects/s for boto3 alone), requests/s and the mean requests in
flight where a proxy counted them, the CPU seconds of the pipeline's process
tree and of the server (both share the machine), and the ratios the targets
name.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import psutil
from run import (
  count_slices,
  first_patient,
  mark_past_fixed_cost,
  measure,
  pipeline_command,
  settle,
)

from tests import proxy, s3server  # noqa: E402  (run puts the repo on the path)

BUCKET = 'bench'
LATENCY = 0.030


def _client(endpoint: str):
  import boto3

  return boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1')


def upload(endpoint: str, data: str, prefix: str = 'DATA') -> list[str]:
  from concurrent.futures import ThreadPoolExecutor

  client = _client(endpoint)
  with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
    client.create_bucket(Bucket=BUCKET)
  keys = []
  for folder, _, names in os.walk(data):
    for name in names:
      path = os.path.join(folder, name)
      keys.append((path, f'{prefix}/' + os.path.relpath(path, data)))
  with ThreadPoolExecutor(16) as pool:
    list(pool.map(lambda pair: client.upload_file(pair[0], BUCKET, pair[1]), keys))
  return [key for _, key in keys]


def boto3_alone(endpoint: str, keys: list[str]) -> float:
  """Objects/s of one boto3 client reading ``keys`` one after another."""
  client = _client(endpoint)
  start = time.perf_counter()
  for key in keys:
    client.get_object(Bucket=BUCKET, Key=key)['Body'].read()
  return len(keys) / (time.perf_counter() - start)


def ceiling(endpoint: str, keys: list[str]) -> float:
  """Objects/s of the pipeline's reader fetching ``keys``, 32 at a time."""
  from concurrent.futures import ThreadPoolExecutor

  from transforms.io import stores

  stores.configure(stores.StoreConfig(s3_endpoint_url=endpoint, s3_region='us-east-1'))
  store = stores.store(f's3://{BUCKET}')
  start = time.perf_counter()
  with ThreadPoolExecutor(32) as pool:
    list(pool.map(lambda key: store.read(f's3://{BUCKET}/{key}'), keys))
  return len(keys) / (time.perf_counter() - start)


def delete_prefix(endpoint: str, prefix: str) -> None:
  client = _client(endpoint)
  listing = client.get_paginator('list_objects_v2').paginate(
    Bucket=BUCKET, Prefix=prefix
  )
  for page in listing:
    objects = [{'Key': o['Key']} for o in page.get('Contents', ())]
    if objects:
      client.delete_objects(Bucket=BUCKET, Delete={'Objects': objects})


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='a local data tree')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--scratch', default=None)
  parser.add_argument(
    '--server',
    choices=('keep-alive', 'moto_server'),
    default='keep-alive',
    help="moto's S3 kept alive (tests/s3server.py) or moto's own server",
  )
  args = parser.parse_args(argv)
  os.environ.setdefault('AWS_ACCESS_KEY_ID', 'bench')
  os.environ.setdefault('AWS_SECRET_ACCESS_KEY', 'bench')
  scratch = tempfile.mkdtemp(prefix='remote-', dir=args.scratch)
  one = first_patient(args.data, os.path.join(scratch, 'ONE'))
  slices = {args.data: count_slices(args.data), one: count_slices(one)}
  out = os.path.join(scratch, 'out')
  results: dict[str, list[dict]] = {}
  with s3server.started(kind=args.server) as (endpoint, server_pid):
    server = psutil.Process(server_pid)

    def server_cpu() -> float:
      times = server.cpu_times()
      return times.user + times.system

    def with_server_cpu(run):
      def measured():
        before = server_cpu()
        row = run()
        row['server cpu'] = server_cpu() - before
        return row

      return measured

    keys = upload(endpoint, args.data)
    one_keys = upload(endpoint, one, 'ONE')
    source = f's3://{BUCKET}/DATA'
    s3 = [f'--s3_endpoint_url={endpoint}', '--s3_region_name=us-east-1']

    def pipeline(name, data, extra, output=out, tree=args.data):
      settle(out)
      delete_prefix(endpoint, 'OUT/')
      m = measure(pipeline_command(data, output, extra))
      return {'rate': slices[tree] / m.seconds, 'seconds': m.seconds, 'cpu': m.cpu}

    def through(delay):
      def run():
        with proxy.started(endpoint, '--delay', str(delay)) as (via, figures):
          row = pipeline('', source, [f'--s3_endpoint_url={via}', *s3[1:]])
        row['requests/s'] = figures['requests'] / row['seconds']
        row['in flight'] = figures['busy_seconds'] / row['seconds']
        return row

      return run

    modes = {
      'local': lambda: pipeline('local', args.data, []),
      's3': lambda: pipeline('s3', source, s3),
      's3 via proxy': through(0.0),
      f's3 +{LATENCY * 1000:.0f} ms': through(LATENCY),
      's3 in and out': lambda: pipeline('s3 out', source, s3, f's3://{BUCKET}/OUT'),
      's3, 1 patient': lambda: pipeline('s3 one', f's3://{BUCKET}/ONE', s3, tree=one),
      'boto3 alone': lambda: {'rate': boto3_alone(endpoint, keys)},
      'server ceiling': lambda: {'rate': ceiling(endpoint, keys)},
    }
    modes = {name: with_server_cpu(run) for name, run in modes.items()}
    for round_ in range(args.runs):
      order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
      for name in order:
        results.setdefault(name, []).append(modes[name]())
        print(f'round {round_ + 1} {name}: {results[name][-1]}', file=sys.stderr)
  shutil.rmtree(scratch, ignore_errors=True)

  def median(name, key):
    values = [r[key] for r in results[name] if key in r]
    return statistics.median(values) if values else None

  # Objects/s, end to end and past the fixed cost that both sizes pay: the
  # unit boto3 alone is measured in (a slice is 1.17 objects with contours).
  for full in results['s3']:
    full['objects/s'] = len(keys) / full['seconds']
  mark_past_fixed_cost(
    results['s3'], results['s3, 1 patient'], len(keys) - len(one_keys)
  )
  print(
    f'\n{slices[args.data]} slices, {len(keys)} objects ({slices[one]} slices, '
    f"{len(one_keys)} objects the first patient's), {args.runs} rounds (medians), "
    f'server: {args.server}\n'
  )
  print(
    '| mode | slices/s | wall s | CPU s | server CPU s | requests/s | mean in flight |'
  )
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for name in modes:
    keys_shown = ('rate', 'seconds', 'cpu', 'server cpu', 'requests/s')
    cells = [median(name, k) for k in keys_shown]
    flight = median(name, 'in flight')
    shown = ['' if c is None else f'{c:.1f}' for c in cells]
    unit = ' (objects/s)' if name in ('boto3 alone', 'server ceiling') else ''
    print(
      f'| {name} | {shown[0]}{unit} | {shown[1]} | {shown[2]} | {shown[3]} | '
      f'{shown[4]} | {"" if flight is None else f"{flight:.1f}"} |'
    )
  rate = {name: median(name, 'rate') for name in modes}
  latency = f's3 +{LATENCY * 1000:.0f} ms'

  def ratio(a: str, b: str, key: str = 'rate') -> str:
    """The median of the per-round ratios (load moves every figure of a
    round together), and the ratio of the medians."""
    pairs = zip(results[a], results[b], strict=True)
    rounds = [x[key] / y['rate'] for x, y in pairs]
    return (
      f'{statistics.median(rounds):.2f}x (per round: '
      f'{", ".join(f"{r:.2f}" for r in rounds)}; of the medians '
      f'{median(a, key) / rate[b]:.2f}x)'
    )

  print()
  print(f'- s3 / local: {ratio("s3", "local")} (target >= 0.5)')
  print(
    f'- s3 / boto3 alone, objects/s past the fixed cost: '
    f'{ratio("s3", "boto3 alone", "marginal")} (target >= 0.8); end to end: '
    f'{ratio("s3", "boto3 alone", "objects/s")} (s3 at '
    f'{median("s3", "objects/s"):.1f} objects/s, {median("s3", "marginal"):.1f} '
    f'past the fixed cost); slices/s over objects/s: {ratio("s3", "boto3 alone")}'
  )
  print(f'- {latency} / s3: {ratio(latency, "s3")} (target >= 0.8)')
  print(f'- {latency} / s3 via proxy: {ratio(latency, "s3 via proxy")}')
  print(f'- s3 in and out / s3: {ratio("s3 in and out", "s3")}')
  ceiling_ratio = ratio('s3', 'server ceiling')
  print(f'- s3 / server ceiling: {ceiling_ratio} (slices/s over objects/s)')


if __name__ == '__main__':
  main()
