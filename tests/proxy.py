"""A proxy in front of an object store or a PACS, for tests and benchmarks.

Run as ``python -m tests.proxy --port P --upstream HOST:PORT [...]``; it
prints ``ready`` once listening and, when stopped with SIGTERM, one JSON line
of figures: requests forwarded, client connections accepted, the
time-integral of requests in flight (``busy_seconds``; divided by a run's
wall time it is the mean number in flight), and requests answered with a
fault.

Two modes:

- ``--delay S``: a TCP pipe that holds every chunk the client sends for S
  seconds before passing it on, like a cloud store's time to first byte
  (a request's head is one chunk). Connections stay open (keep-alive).
- HTTP-aware, one request per connection (``Connection: close`` is forced
  on both sides: in the request, and in the answer's head), with faults.
  Each fault is ``PATTERN=N``: the first N requests whose request line
  contains PATTERN get it (N < 0: all of them); the first rule that
  matches a request applies (``--fail`` rules first, then ``--cut``, then
  ``--hang``, each in the order given).

  - ``--fail PATTERN=N``: answered ``503 SlowDown`` without reaching the
    server, so clients must retry; ``--retry-after S`` adds
    ``Retry-After: S`` to these answers.
  - ``--cut PATTERN=N``: the server's answer is passed on up to half of its
    body, then the connection is closed: a body that breaks off.
  - ``--hang PATTERN=N``: the request is read and never answered (a server
    that never answers); the connection stays open until the client or the
    proxy goes.
  - ``--drop-param NAME``: query parameter NAME is removed from every
    request (a server that ignores it, e.g. ``offset``); ``--set-param
    NAME=VALUE`` sets one on every request that has a query (e.g. a server
    that caps every answer: ``limit=3``).
  - ``--events PATH``: a line is appended to PATH as each fault happens
    (``<time> <kind> <request line>``, the time ``time.monotonic()``'s, a
    clock every process shares), so a test can wait for one, and measure
    the time between two.

  ``--http`` alone gives this mode without faults (``--delay`` then holds
  each request), so ``max_in_flight`` counts concurrent requests exactly.
  ``--tls PEM`` serves https with the key and certificate in PEM (see
  ``self_signed``) and forwards plain HTTP.
  ``--stop-after K --upstream-pid PID`` kills the server (SIGKILL to PID)
  once K requests have been answered: a server going away mid-run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SLOW_DOWN = (
  b'HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n'
  b'Connection: close\r\nContent-Length: %d\r\n\r\n%s'
)
_SLOW_DOWN_BODY = (
  b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
  b'<Message>Please reduce your request rate.</Message></Error>'
)


class Stats:
  def __init__(self):
    self.requests = 0
    self.connections = 0
    self.faults = 0
    self.in_flight = 0
    self.busy = 0.0
    self.max_in_flight = 0
    self.answered = 0
    self._since = time.monotonic()

  def _tick(self) -> None:
    now = time.monotonic()
    self.busy += self.in_flight * (now - self._since)
    self._since = now

  def start(self) -> None:
    self._tick()
    self.requests += 1
    self.in_flight += 1
    self.max_in_flight = max(self.max_in_flight, self.in_flight)

  def end(self) -> None:
    self._tick()
    self.in_flight -= 1

  def figures(self) -> dict:
    self._tick()
    return {
      'requests': self.requests,
      'connections': self.connections,
      'busy_seconds': round(self.busy, 3),
      'faults': self.faults,
      'max_in_flight': self.max_in_flight,
    }


async def _pipe_delayed(reader, writer, delay, stats, waiting):
  """Client -> server: each chunk after ``delay``; a chunk starts a request."""
  try:
    while chunk := await reader.read(65536):
      stats.start()
      waiting.append(True)
      if delay:
        await asyncio.sleep(delay)
      writer.write(chunk)
      await writer.drain()
  finally:
    writer.close()


async def _pipe_back(reader, writer, stats, waiting):
  """Server -> client: the first bytes after a request end its wait."""
  try:
    while chunk := await reader.read(65536):
      while waiting:
        waiting.pop()
        stats.end()
      writer.write(chunk)
      await writer.drain()
  finally:
    writer.close()


async def _delaying(client_reader, client_writer, upstream, delay, stats):
  host, port = upstream
  server_reader, server_writer = await asyncio.open_connection(host, port)
  waiting: list = []
  await asyncio.gather(
    _pipe_delayed(client_reader, server_writer, delay, stats, waiting),
    _pipe_back(server_reader, client_writer, stats, waiting),
    return_exceptions=True,
  )
  while waiting:
    waiting.pop()
    stats.end()


class Faults:
  """The HTTP mode's faults and rewrites (see the module docstring)."""

  KINDS = ('fail', 'cut', 'hang')

  def __init__(
    self,
    rules: list[tuple[str, str, int]] = (),
    retry_after: str | None = None,
    drop: tuple[str, ...] = (),
    set_params: tuple[tuple[str, str], ...] = (),
    events: str | None = None,
  ):
    self.rules = [list(rule) for rule in rules]  # [kind, pattern, left]
    self.retry_after = retry_after
    self.drop = tuple(drop)
    self.set_params = tuple(set_params)
    self.events = events

  def __bool__(self) -> bool:
    return bool(self.rules or self.drop or self.set_params)

  def take(self, request_line: str) -> str | None:
    """The kind of fault this request gets (its rule counted), or None."""
    for rule in self.rules:
      kind, pattern, left = rule
      if pattern in request_line and left != 0:
        rule[2] = left - 1
        return kind
    return None

  def note(self, kind: str, request_line: str) -> None:
    if self.events:
      with open(self.events, 'a', encoding='utf-8') as f:
        f.write(f'{time.monotonic():.3f} {kind} {request_line}\n')

  def rewrite(self, request_line: bytes) -> bytes:
    """The request line with the dropped parameters removed and the set ones
    set (only for a request that has a query)."""
    if not (self.drop or self.set_params):
      return request_line
    method, target, version = request_line.split(b' ', 2)
    path, sep, query = target.partition(b'?')
    if not sep:
      return request_line
    names = {name.encode() for name in self.drop}
    names |= {name.encode() for name, _ in self.set_params}
    kept = [p for p in query.split(b'&') if p and p.split(b'=', 1)[0] not in names]
    kept += [f'{name}={value}'.encode() for name, value in self.set_params]
    return b' '.join([method, path + b'?' + b'&'.join(kept), version])

  def slow_down(self) -> bytes:
    extra = f'Retry-After: {self.retry_after}\r\n' if self.retry_after else ''
    head = _SLOW_DOWN.replace(
      b'Connection: close\r\n', extra.encode() + b'Connection: close\r\n'
    )
    return head % (len(_SLOW_DOWN_BODY), _SLOW_DOWN_BODY)


def _closing(answer: bytes) -> bytes:
  """An answer (its head whole) with ``Connection: close`` in its head, so
  that a client never reuses a connection this proxy closes (a server may
  answer keep-alive to a request that asked for close)."""
  head, _, rest = answer.partition(b'\r\n\r\n')
  lines = head.split(b'\r\n')
  kept = [
    line
    for line in lines[1:]
    if line.split(b':', 1)[0].strip().lower() not in (b'connection', b'keep-alive')
  ]
  return b'\r\n'.join([lines[0], *kept, b'Connection: close', b'', b'']) + rest


async def _faulting(client_reader, client_writer, upstream, faults, stats, delay, kill):
  try:
    head = await client_reader.readuntil(b'\r\n\r\n')
  except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
    client_writer.close()
    return
  lines = head.split(b'\r\n')
  request_line = lines[0].decode('latin-1')
  length = 0
  kept = [faults.rewrite(lines[0])]
  for line in lines[1:]:
    name = line.split(b':', 1)[0].strip().lower()
    if name == b'content-length':
      length = int(line.split(b':', 1)[1])
    if name not in (b'connection', b'keep-alive') and line:
      kept.append(line)
  body = await client_reader.readexactly(length) if length else b''
  answered = False
  stats.start()
  try:
    kind = faults.take(request_line)
    if kind is not None:
      stats.faults += 1
      faults.note(kind, request_line)
    if kind == 'fail':
      client_writer.write(faults.slow_down())
      await client_writer.drain()
      return
    if kind == 'hang':  # until the client hangs up or the proxy stops
      await client_reader.read()
      return
    if delay:
      await asyncio.sleep(delay)
    server_reader, server_writer = await asyncio.open_connection(*upstream)
    try:
      server_writer.write(b'\r\n'.join([*kept, b'Connection: close', b'', b'']) + body)
      await server_writer.drain()
      if kind == 'cut':
        answer = _closing(await server_reader.read())  # the server closes
        answered = True
        stats.end()
        head_end = answer.find(b'\r\n\r\n') + 4
        cut = head_end + max(1, (len(answer) - head_end) // 2)
        client_writer.write(answer[:cut])
        await client_writer.drain()
        return
      head = b''
      while chunk := await server_reader.read(65536):
        if not answered:  # the answer has begun: the request is no longer
          answered = True  # in flight (the client may send its next one
          stats.end()  # before this connection's upstream end is seen)
        if head is not None:  # the answer's head: Connection: close forced
          head += chunk
          if b'\r\n\r\n' not in head:
            continue
          chunk, head = _closing(head), None
        client_writer.write(chunk)
        await client_writer.drain()
      if head:
        client_writer.write(head)
        await client_writer.drain()
    finally:  # the client may hang up first, once it has its answer
      server_writer.close()
      stats.answered += 1
      after, pid = kill
      if after and stats.answered == after:
        os.kill(pid, signal.SIGKILL)
  finally:
    if not answered:
      stats.end()
    client_writer.close()


async def serve(
  port: int,
  upstream: tuple[str, int],
  delay: float,
  faults: Faults,
  http: bool,
  kill: tuple[int, int] = (0, 0),
  tls: str | None = None,
):
  stats = Stats()

  async def handle(reader, writer):
    stats.connections += 1
    if faults or http:
      await _faulting(reader, writer, upstream, faults, stats, delay, kill)
    else:
      await _delaying(reader, writer, upstream, delay, stats)

  context = None
  if tls:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls)
  server = await asyncio.start_server(
    handle, '127.0.0.1', port, backlog=512, ssl=context
  )
  stop = asyncio.Event()
  loop = asyncio.get_running_loop()
  loop.set_exception_handler(lambda *_: None)  # connections cut at the stop
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  print('ready', flush=True)
  async with server:
    await stop.wait()
  print(json.dumps(stats.figures()), flush=True)


def self_signed(folder: str) -> tuple[str, str]:
  """A self-signed certificate for 127.0.0.1: (the proxy's PEM, key and
  certificate; the certificate alone, a CA bundle for clients)."""
  import datetime
  import ipaddress

  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import rsa
  from cryptography.x509.oid import NameOID

  key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'test-pacs')])
  now = datetime.datetime.now(datetime.timezone.utc)
  certificate = (
    x509.CertificateBuilder()
    .subject_name(name)
    .issuer_name(name)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(minutes=5))
    .not_valid_after(now + datetime.timedelta(days=1))
    .add_extension(
      x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]),
      critical=False,
    )
    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    .sign(key, hashes.SHA256())
  )
  cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
  key_pem = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.TraditionalOpenSSL,
    serialization.NoEncryption(),
  )
  both, alone = os.path.join(folder, 'server.pem'), os.path.join(folder, 'ca.pem')
  with open(both, 'wb') as f:
    f.write(key_pem + cert_pem)
  with open(alone, 'wb') as f:
    f.write(cert_pem)
  return both, alone


@contextlib.contextmanager
def started(upstream: str, *arguments: str):
  """This proxy in its own process in front of ``upstream`` (a URL), on a
  free port of 127.0.0.1, stopped by its pid; yields (endpoint, figures),
  figures filled with the proxy's counts once it has stopped."""
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  process = subprocess.Popen(
    [
      sys.executable,
      '-m',
      'tests.proxy',
      '--port',
      str(port),
      '--upstream',
      upstream.split('://', 1)[1],
      *arguments,
    ],
    cwd=_REPO,
    stdout=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  figures: dict = {}
  try:
    if process.stdout.readline().strip() != 'ready':
      raise RuntimeError('the proxy did not start')
    scheme = 'https' if '--tls' in arguments else 'http'
    yield f'{scheme}://127.0.0.1:{port}', figures
  finally:
    process.terminate()
    out, _ = process.communicate(timeout=30)
    figures.update(json.loads(out.strip().splitlines()[-1]))


def _rule(text: str) -> tuple[str, int]:
  pattern, _, n = text.rpartition('=')
  return pattern, int(n)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m tests.proxy')
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--upstream', required=True, help='HOST:PORT')
  parser.add_argument('--delay', type=float, default=0.0)
  for kind in Faults.KINDS:
    parser.add_argument(f'--{kind}', action='append', default=[], help='PATTERN=N')
  parser.add_argument('--retry-after', default=None, help="the 503s' Retry-After")
  parser.add_argument('--drop-param', action='append', default=[], help='NAME')
  parser.add_argument('--set-param', action='append', default=[], help='NAME=VALUE')
  parser.add_argument('--events', default=None, help='a file: a line per fault')
  parser.add_argument('--http', action='store_true', help='HTTP-aware, no faults')
  parser.add_argument('--stop-after', type=int, default=0, help='K answers')
  parser.add_argument('--upstream-pid', type=int, default=0)
  parser.add_argument('--tls', default=None, help='PEM: key and certificate')
  args = parser.parse_args(argv)
  host, _, port = args.upstream.rpartition(':')
  rules = []
  for kind in Faults.KINDS:
    rules += [(kind, *_rule(text)) for text in getattr(args, kind)]
  faults = Faults(
    rules,
    args.retry_after,
    tuple(args.drop_param),
    tuple(tuple(p.split('=', 1)) for p in args.set_param),
    args.events,
  )
  kill = (args.stop_after, args.upstream_pid)
  asyncio.run(
    serve(args.port, (host, int(port)), args.delay, faults, args.http, kill, args.tls)
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
