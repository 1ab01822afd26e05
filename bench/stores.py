"""The pipeline's S3 client (obstore) against boto3 and bare obstore, alone.

Against moto's S3 kept alive (tests/s3server.py) on 127.0.0.1, the same
``--objects`` objects of ``--size`` bytes (a 256 x 256 int16 slice is about
131 KB) are read 32 at a time, in interleaved rounds (every other one in
reverse order), by:

- ``ours``: transforms.io.s3.S3Store.read (obstore's ``get``, its error
  mapping and the copy to ``bytes``), from a thread pool of 32, as the decode
  stage's prefetcher reads;
- ``boto3 get_object``: one shared boto3 client (a pool of 40 connections)
  from the same thread pool: what the pipeline used before its own signed
  GETs, and what a user writes;
- ``obstore threads``: ``obstore.get(store, key).bytes()`` from the same
  thread pool (obstore releases the GIL while it waits): ours without its
  wrapper;
- ``obstore async``: ``obstore.get_async`` under asyncio, 32 at a time.

Each round prints objects/s and the client's CPU ms per object (this
process's CPU, obstore's runtime threads included) and the server's; the
table gives medians and each mode's ratio to ``ours`` (medians of per-round
ratios). Then, once each: a listing of every object (ours: boto3's
paginator; obstore: ``list``), a conditional create of an existing key (both must
refuse it), a 20 MiB upload (multipart in both), and the import time of each
client in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)

import psutil  # noqa: E402

from tests import s3server  # noqa: E402
from transforms.io import protocol  # noqa: E402
from transforms.io.s3 import S3Store  # noqa: E402

BUCKET = 'bench'
IN_FLIGHT = 32


def _ours(endpoint: str) -> S3Store:
  return S3Store(
    protocol.StoreConfig(
      s3_endpoint_url=endpoint, s3_region='us-east-1', read_concurrency=IN_FLIGHT
    )
  )


def _obstore(endpoint: str):
  from obstore.store import S3Store as ObStore

  return ObStore(
    BUCKET,
    endpoint=endpoint,
    region='us-east-1',
    access_key_id=os.environ['AWS_ACCESS_KEY_ID'],
    secret_access_key=os.environ['AWS_SECRET_ACCESS_KEY'],
    client_options={'allow_http': True, 'pool_max_idle_per_host': str(IN_FLIGHT + 8)},
    retry_config={'max_retries': protocol.DEFAULT_ATTEMPTS - 1},
  )


def _timed(read_all) -> tuple[float, float]:
  """(seconds, this process's CPU seconds) of ``read_all()``."""
  cpu, wall = time.process_time(), time.perf_counter()
  read_all()
  return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--objects', type=int, default=1150)
  parser.add_argument('--size', type=int, default=131_072 + 1_500)
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args(argv)
  os.environ.setdefault('AWS_ACCESS_KEY_ID', 'bench')
  os.environ.setdefault('AWS_SECRET_ACCESS_KEY', 'bench')
  import obstore

  keys = [f'DATA/{k // 240}/{k}.dcm' for k in range(args.objects)]
  with s3server.started() as (endpoint, server_pid):
    server = psutil.Process(server_pid)
    ours, theirs = _ours(endpoint), _obstore(endpoint)
    ours._client.create_bucket(Bucket=BUCKET)
    payload = os.urandom(args.size)
    with ThreadPoolExecutor(16) as pool:
      list(pool.map(lambda key: obstore.put(theirs, key, payload), keys))

    def by_ours():
      with ThreadPoolExecutor(IN_FLIGHT) as pool:
        for data in pool.map(lambda key: ours.read(f's3://{BUCKET}/{key}'), keys):
          assert len(data) == args.size

    import boto3
    from botocore.config import Config

    plain = boto3.client(
      's3',
      endpoint_url=endpoint,
      region_name='us-east-1',
      config=Config(max_pool_connections=IN_FLIGHT + 8),
    )

    def by_boto3():
      with ThreadPoolExecutor(IN_FLIGHT) as pool:
        read = lambda key: plain.get_object(Bucket=BUCKET, Key=key)['Body'].read()  # noqa: E731
        for data in pool.map(read, keys):
          assert len(data) == args.size

    def by_obstore_threads():
      with ThreadPoolExecutor(IN_FLIGHT) as pool:
        for data in pool.map(lambda key: obstore.get(theirs, key).bytes(), keys):
          assert len(data) == args.size

    def by_obstore_async():
      async def read_all():
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(key):
          async with gate:
            got = await obstore.get_async(theirs, key)
            return await got.bytes_async()

        for data in await asyncio.gather(*(one(key) for key in keys)):
          assert len(data) == args.size

      asyncio.run(read_all())

    modes = {
      'ours': by_ours,
      'boto3 get_object': by_boto3,
      'obstore threads': by_obstore_threads,
      'obstore async': by_obstore_async,
    }
    for warm in modes.values():  # connections made, code paths loaded
      warm()
    rows: dict[str, list[dict]] = {name: [] for name in modes}
    for round_ in range(args.runs):
      order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
      for name in order:
        before = sum(server.cpu_times()[:2])
        seconds, cpu = _timed(modes[name])
        server_cpu = sum(server.cpu_times()[:2]) - before
        row = {
          'objects/s': len(keys) / seconds,
          'client ms/object': 1000 * cpu / len(keys),
          'server ms/object': 1000 * server_cpu / len(keys),
        }
        rows[name].append(row)
        shown = ', '.join(f'{k} {v:.2f}' for k, v in row.items())
        print(f'round {round_ + 1} {name}: {shown}', file=sys.stderr)

    print(f'\n{len(keys)} objects of {args.size} bytes, {IN_FLIGHT} in flight, ')
    print(f'medians of {args.runs} interleaved rounds (ratio: per-round, to ours)\n')
    columns = ['client', 'objects/s', 'ratio', 'client CPU ms/object', 'ratio']
    print('| ' + ' | '.join([*columns, 'server CPU ms/object']) + ' |')
    print('| --- | --- | --- | --- | --- | --- |')
    for name, results in rows.items():
      med = {k: statistics.median(r[k] for r in results) for k in results[0]}
      rate = statistics.median(
        r['objects/s'] / o['objects/s']
        for r, o in zip(results, rows['ours'], strict=True)
      )
      cpu = statistics.median(
        r['client ms/object'] / o['client ms/object']
        for r, o in zip(results, rows['ours'], strict=True)
      )
      print(
        f'| {name} | {med["objects/s"]:.0f} | {rate:.2f}x | '
        f'{med["client ms/object"]:.2f} | {cpu:.2f}x | {med["server ms/object"]:.2f} |'
      )

    print()
    listed_ours = _timed(lambda: list(ours.files(f's3://{BUCKET}/DATA/')))[0]
    listed_theirs = _timed(
      lambda: [m for chunk in obstore.list(theirs, 'DATA/') for m in chunk]
    )[0]
    print(
      f'listing {len(keys)} objects: ours {listed_ours:.3f} s, obstore '
      f'{listed_theirs:.3f} s'
    )
    refused_ours = not ours.create_exclusive(f's3://{BUCKET}/{keys[0]}', b'x')
    try:
      obstore.put(theirs, keys[0], b'x', mode='create')
      refused_theirs = False
    except Exception as e:  # obstore.exceptions.AlreadyExistsError
      refused_theirs = type(e).__name__
    print(
      f'conditional create of an existing key refused: ours {refused_ours}, '
      f'obstore {refused_theirs}'
    )
    big = os.urandom(20 * 1024 * 1024)

    def upload_ours():
      f = ours.create(f's3://{BUCKET}/BIG/ours')
      f.write(big)
      f.close()

    up_ours = _timed(upload_ours)[0]
    up_theirs = _timed(lambda: obstore.put(theirs, 'BIG/theirs', big))[0]
    same = (
      ours.read(f's3://{BUCKET}/BIG/theirs') == big
      and obstore.get(theirs, 'BIG/ours').bytes() == big
    )
    print(
      f'20 MiB upload: ours {up_ours:.2f} s, obstore {up_theirs:.2f} s '
      f'(each read back by the other: {same})'
    )
  for code in (
    'import boto3',
    'import obstore, obstore.store',
  ):
    times = []
    for _ in range(5):
      start = time.perf_counter()
      subprocess.run([sys.executable, '-c', code], check=True)
      times.append(time.perf_counter() - start)
    print(f'import ({code}): median {statistics.median(times):.3f} s')


if __name__ == '__main__':
  with contextlib.suppress(KeyboardInterrupt):
    main()
