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
import ssl
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


def _authorization(user: str = USER, password: str = PASSWORD) -> str:
  return 'Basic ' + base64.b64encode(f'{user}:{password}'.encode()).decode()


def request(
  server_root: str, method: str, path: str, data: bytes | None = None, cafile=None
):
  """(status, body) of one authenticated request to Orthanc's REST API
  (``cafile``: the CA that verifies an https server)."""
  req = urllib.request.Request(
    server_root + path,
    data=data,
    method=method,
    headers={'Authorization': _authorization(), 'Expect': ''},
  )
  context = ssl.create_default_context(cafile=cafile) if cafile else None
  try:
    with urllib.request.urlopen(req, timeout=60, context=context) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def self_signed(folder: str) -> tuple[str, str]:
  """A self-signed certificate for 127.0.0.1: (Orthanc's PEM, key and
  certificate; the certificate alone, a CA bundle for clients)."""
  import datetime
  import ipaddress

  from cryptography import x509
  from cryptography.hazmat.primitives import hashes, serialization
  from cryptography.hazmat.primitives.asymmetric import ec
  from cryptography.x509.oid import NameOID

  key = ec.generate_private_key(ec.SECP256R1())
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
def started(folder: str, tls: bool = False, **settings):
  """Orthanc on a free port of 127.0.0.1 with its storage in ``folder``;
  ``settings`` are added to its configuration. With ``tls``, it serves https
  with a self-signed certificate, ``folder``/ca.pem. Yields a Server."""
  os.makedirs(folder, exist_ok=True)
  port = free_port()
  if tls:
    pem, cafile = self_signed(folder)
    settings = {'SslEnabled': True, 'SslCertificate': pem, **settings}
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
  scheme = 'https' if tls else 'http'
  server = Server(f'{scheme}://127.0.0.1:{port}', process.pid)
  try:
    deadline = time.monotonic() + 60
    while True:
      try:
        if (
          request(server.root, 'GET', '/system', cafile=cafile if tls else None)[0]
          == 200
        ):
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
