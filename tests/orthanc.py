"""A real Orthanc PACS for the tests and the benchmark.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages (``.ci/run`` installs
them). ``started`` writes a configuration into a folder of its own (storage
and index there, HTTP on a free port of 127.0.0.1, no DICOM port, remote
access off, authentication on), starts ``/usr/sbin/Orthanc``, waits for
``GET /system`` and stops the server by its pid. ``upload_tree`` stores a
tree's slice files with ``POST /instances``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import NamedTuple

import pytest

from tests.helpers import free_port

ORTHANC = '/usr/sbin/Orthanc'
PLUGIN = '/usr/share/orthanc/plugins/libOrthancDicomWeb.so'
USER = 'radiology'
PASSWORD = 'pacs-Secret-7f3a9c'


def missing() -> str | None:
  """Why no Orthanc can be started here, or None."""
  for path, package in ((ORTHANC, 'orthanc'), (PLUGIN, 'orthanc-dicomweb')):
    if not os.path.exists(path):
      return f'{path} not found (apt-get install {package})'
  return None


def require() -> None:
  """Skips the test without Orthanc; under CI (CI=true) fails it instead."""
  reason = missing()
  if reason is not None:
    if os.environ.get('CI'):
      pytest.fail(f'Orthanc is not installed: {reason}; .ci/run installs it')
    pytest.skip(f'Orthanc is not installed: {reason}')


class Server(NamedTuple):
  root: str  # http(s)://127.0.0.1:PORT
  pid: int

  @property
  def dicomweb(self) -> str:
    return f'{self.root}/dicom-web'


def authorization(user: str = USER, password: str = PASSWORD) -> str:
  """The Basic Authorization header value of the test user."""
  return 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()


def request(server_root: str, method: str, path: str, data: bytes | None = None):
  """(status, body) of one authenticated request to Orthanc's REST API."""
  req = urllib.request.Request(
    server_root + path,
    data=data,
    method=method,
    headers={'Authorization': authorization(), 'Expect': ''},
  )
  try:
    with urllib.request.urlopen(req, timeout=60) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


@contextlib.contextmanager
def started(folder: str, **settings):
  """Orthanc on a free port of 127.0.0.1 with its storage in ``folder``;
  ``settings`` are added to its configuration. Yields a Server. (For https,
  put tests/proxy.py with --tls in front: Debian's Orthanc 1.10 resets TLS
  connections after the handshake.)"""
  os.makedirs(folder, exist_ok=True)
  port = free_port()
  config = {
    'Name': 'test-pacs',
    'StorageDirectory': os.path.join(folder, 'storage'),
    'IndexDirectory': os.path.join(folder, 'index'),
    'HttpPort': port,
    'DicomServerEnabled': False,
    'RemoteAccessAllowed': False,
    'AuthenticationEnabled': True,
    'RegisteredUsers': {USER: PASSWORD},
    'Plugins': [PLUGIN],
    'DicomWeb': {'Enable': True, 'Root': '/dicom-web/'},
    'HttpThreadsCount': 64,
    **settings,
  }
  path = os.path.join(folder, 'orthanc.json')
  with open(path, 'w') as f:
    json.dump(config, f)
  log = open(os.path.join(folder, 'orthanc.log'), 'w')
  process = subprocess.Popen(
    [ORTHANC, path],
    stdout=log,
    stderr=subprocess.STDOUT,
    cwd=folder,
    start_new_session=True,
  )
  server = Server(f'http://127.0.0.1:{port}', process.pid)
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        if request(server.root, 'GET', '/system')[0] == 200:
          break
      except OSError:
        pass
      if process.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f'Orthanc did not start; see {log.name}')
      time.sleep(0.1)
    yield server
  finally:
    stop(server)
    process.wait(timeout=30)
    log.close()


def stop(server: Server) -> None:
  """Stops the server by its pid (again: a no-op)."""
  with contextlib.suppress(ProcessLookupError):
    os.kill(server.pid, signal.SIGTERM)


def upload(server: Server, path: str) -> bool:
  """Stores one file; False if Orthanc refused it or already held it."""
  with open(path, 'rb') as f:
    status, body = request(server.root, 'POST', '/instances', f.read())
  return status == 200 and json.loads(body).get('Status') == 'Success'


def upload_tree(server: Server, root: str) -> tuple[list[str], list[str]]:
  """Uploads every file under ``root``/dicoms; (stored, refused) as paths
  relative to ``root``, sorted."""
  stored, refused = [], []
  top = os.path.join(root, 'dicoms')
  for folder, _, names in sorted(os.walk(top)):
    for name in sorted(names):
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, root).replace(os.sep, '/')
      (stored if upload(server, path) else refused).append(relative)
  return stored, refused
