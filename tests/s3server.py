"""An S3-compatible server for tests and benchmarks: moto's S3, kept alive.

Run as ``python -m tests.s3server --port P``; it prints ``ready`` once
listening and runs until SIGTERM. ``started()`` runs it on a free port of
127.0.0.1 and stops it by its pid.

moto's own ``moto_server`` is Werkzeug's development server in front of all
of moto's services. Two of its habits are unlike S3 and made it the bound of
every S3 figure (BENCHMARKS.md): it closes the connection after every answer
(``Connection: close``), so a client's connection pool never reuses one and
every request pays a new connection and a new server thread; and it finds
the service of every request by listing moto's package folder and trying
each service's URL patterns in turn, under one lock. This serves moto's S3
application alone (``create_backend_app('s3')``, the one that dispatcher
picks for S3 requests: the same buckets, objects and answers) with cheroot
(CherryPy's WSGI server): HTTP/1.1 keep-alive and a fixed pool of threads.
(waitress 3.0.2 was tried first: it never answers a PUT of an empty body
sent with ``Expect: 100-continue``, as botocore sends every PUT.)

The one difference from ``moto_server``: other AWS services are not served.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# moto's S3 is Python under one GIL: more threads only queue for it.
THREADS = 8


def application():
  """moto's S3 application, with the raw request URI moto reads its keys
  from (an encoded slash in a key must reach it encoded): Werkzeug calls it
  RAW_URI, cheroot REQUEST_URI."""
  from moto.server import create_backend_app

  s3 = create_backend_app('s3')

  def app(environ, start_response):
    environ.setdefault('RAW_URI', environ.get('REQUEST_URI', ''))
    return s3(environ, start_response)

  return app


def _command(kind: str, port: int) -> list[str]:
  if kind == 'moto_server':  # moto's own, for comparison (bench/remote.py)
    server = shutil.which('moto_server') or os.path.join(
      os.path.dirname(sys.executable), 'moto_server'
    )
    return [server, '-H', '127.0.0.1', '-p', str(port)]
  return [sys.executable, '-m', 'tests.s3server', '--port', str(port)]


@contextlib.contextmanager
def started(log=subprocess.DEVNULL, kind: str = 'keep-alive'):
  """The server in its own process on a free port of 127.0.0.1, stopped by
  its pid; yields (endpoint URL, pid). ``kind``: 'keep-alive' (this module)
  or 'moto_server'. ``log``: where its output goes."""
  from tests.helpers import free_port, wait_for_port

  port = free_port()
  process = subprocess.Popen(
    _command(kind, port),
    cwd=_REPO,
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  try:
    wait_for_port(port, process, 'the S3 server')
    yield f'http://127.0.0.1:{port}', process.pid
  finally:
    process.terminate()
    process.wait(timeout=30)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m tests.s3server')
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--threads', type=int, default=THREADS)
  args = parser.parse_args(argv)
  from cheroot import wsgi

  server = wsgi.Server(
    ('127.0.0.1', args.port),
    application(),
    numthreads=args.threads,
    request_queue_size=128,  # the listen backlog: a pool connects 40 at once
  )
  server.prepare()
  print('ready', flush=True)
  server.serve()
  return 0


if __name__ == '__main__':
  sys.exit(main())
