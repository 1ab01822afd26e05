"""Identifiers planted everywhere an input can carry them (folder and file
names, link.csv, every header, contour text, options), for every source
(a tree, S3, a PACS), with faults injected so the retry paths run: after a
pseudonymised run, no planted value is in any output byte, any Parquet
value, the console or any log line (issue 35, defect 2). And the order of
the rows carries nothing of the ids as stored.
"""

import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from beam_pipeline.launch import cli
from beam_pipeline.tools import keys, sample
from tests.helpers import identifiers, leaks, parquet_text, texts_under
from transforms.contract import layout, redact, schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'DOE^JOHN'  # a name as a contour header line would carry it


def _plant(root: str) -> set[str]:
  """Identifiers where the layout leaves room: a contour file whose first
  line is a header naming the patient, a stray file and a sub-folder named
  after the patient. Returns what was planted (beyond the ids)."""
  with open(os.path.join(root, layout.LINK_FILE), encoding='utf-8-sig') as f:
    pid, oid = f.read().splitlines()[1].split(',')[:2]  # as the tree has them
  contours = os.path.join(root, layout.CONTOUR_DIR, oid, 'i-contours')
  first = sorted(os.listdir(contours))[0]
  with open(os.path.join(contours, first), 'rb') as f:
    body = f.read()
  with open(os.path.join(contours, first), 'wb') as f:
    f.write(f'Patient {pid} {NAME}\n'.encode() + body)
  with open(os.path.join(root, layout.DICOM_DIR, pid, f'{pid}_{NAME}.txt'), 'w') as f:
    f.write('notes\n')
  os.makedirs(os.path.join(root, layout.CONTOUR_DIR, oid, f'{pid}-extra'))
  with open(os.path.join(root, layout.CONTOUR_DIR, oid, f'{pid}-extra', 'x'), 'w') as f:
    f.write('x\n')
  return {NAME, 'JOHN'}


def _env(logs: str, **more) -> dict:
  return dict(os.environ, CARDIAC_MRI_LOG_DIR=logs, **more)


def _run(args, env):
  """run_pipeline.py in a process of its own: (exit code, stdout, stderr)."""
  done = subprocess.run(
    [sys.executable, 'run_pipeline.py', *args],
    cwd=REPO,
    capture_output=True,
    env=env,
    timeout=300,
  )
  return done.returncode, done.stdout, done.stderr


def _places(out, logs, stdout, stderr):
  places = [*texts_under(out), *texts_under(logs)]
  places += [('stdout', stdout), ('stderr', stderr)]
  return places + [('parquet values', parquet_text(out))]


def _patient_order(out: str, table: str) -> list[str]:
  (path,) = [
    os.path.join(out, table, name)
    for name in os.listdir(os.path.join(out, table))
    if name.endswith('.parquet')
  ]
  order: list[str] = []
  for pid in pq.read_table(path, columns=['patient_id']).column(0).to_pylist():
    if pid and pid not in order:
      order.append(pid)
  return order


@pytest.fixture(scope='module')
def planted_tree(tmp_path_factory):
  base = tmp_path_factory.mktemp('planted')
  root = str(base / 'DATA')
  manifest = sample.make_tree(
    root, patients=5, slices=4, rows=16, columns=16, quirks=['phi']
  )
  planted = _plant(root)
  key = str(base / 'key')
  assert cli.command(['keygen', key]) == cli.EXIT_OK
  return base, root, manifest, planted, key


def test_a_tree_run_shows_no_planted_identifier_anywhere(planted_tree):
  base, root, manifest, planted, key = planted_tree
  out, logs = str(base / 'out'), str(base / 'logs')
  id_map = str(base / 'map.csv')
  code, stdout, stderr = _run(
    [
      '--input',
      root,
      '--output',
      out,
      '--pseudonymize-key-file',
      key,
      '--id-map',
      id_map,
    ],
    _env(logs),
  )
  assert code == cli.EXIT_DROPPED, stderr.decode()[-2000:]
  forbidden = identifiers(root, manifest) | planted
  places = _places(out, logs, stdout, stderr)
  assert os.listdir(logs) and len(places) >= 10
  assert not leaks(forbidden, places)
  # The planted contour header is one contour row, quoting no text of it.
  errors = pq.read_table(os.path.join(out, schema.ERRORS_DIR)).to_pylist()
  (row,) = [r for r in errors if r['stage'] == schema.STAGE_CONTOUR]
  assert 'line 1: expected two numbers' in row['error'], row
  # Rows in the order of the pseudonyms, whatever the order of the ids as
  # stored (link.csv and the folders list them SCD0000101, 102, ...).
  shown = {e.original: e.pseudonym for e in keys.read_id_map(id_map)}
  by_link = [shown[pid] for pid, _ in manifest.links]
  assert sorted(by_link) != by_link and sorted(by_link) != by_link[::-1]
  for table in (schema.SLICES_DIR, schema.RECONCILIATION_DIR):
    order = _patient_order(out, table)
    assert order == sorted(order) and set(order) <= set(by_link), table


def test_without_a_key_rows_come_in_the_order_of_the_ids(planted_tree, tmp_path):
  _, root, manifest, _, _ = planted_tree
  out = str(tmp_path / 'out')
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_DROPPED
  ids = sorted(pid for pid, _ in manifest.links)
  assert _patient_order(out, schema.SLICES_DIR) == ids


@pytest.mark.parametrize(
  'text, hidden, kept',
  [
    (
      "Retrying (Retry(total=2)) after connection broken by 'ProtocolError(x)': "
      '/dicom-web/studies/1.2.826.0.1.3/series/1.2.826.0.1.4/instances/1.2.9.9.1',
      ['1.2.826.0.1.3', '1.2.826.0.1.4', '1.2.9.9.1', 'ProtocolError(x)'],
      ['Retrying', 'after connection broken by'],
    ),
    (
      'GET http://127.0.0.1:8042/bucket/dicoms/SCD0000101/1.dcm?x=1 failed',
      ['SCD0000101', 'bucket', 'x=1'],
      ['http://127.0.0.1:8042/<path>', 'failed'],
    ),
    (
      "Invalid value for VR UI: '1.2.01.3'; transfer syntax 1.2.840.10008.1.2.1",
      ['1.2.01.3'],
      ['1.2.840.10008.1.2.1', "'<8 characters>'"],
    ),
    (
      "'1.2.840.10008.5.1.4 DOE^JOHN' '1.2.840.10008DOE' 1.2.840.100081.7.3.9",
      ['DOE', '100081'],
      ["'<28 characters>'", "'<16 characters>'", '<uid>'],
    ),
    (
      "[Errno 2] No such file or directory: '/data/dicoms/SCD0000101/3.dcm'",
      ['SCD0000101', '/data'],
      ['No such file or directory'],
    ),
    (
      's3://cohort/dicoms/SCD0000101/ and "DOE^JOHN" at 10.1.2.3.4',
      ['SCD0000101', 'DOE^JOHN', '10.1.2.3.4'],
      ['s3://cohort/<path>', '"<8 characters>"'],  # the bucket is the user's
    ),
  ],
)
def test_text_from_elsewhere_is_redacted(text, hidden, kept):
  shown = redact.text(text)
  assert not [h for h in hidden if h in shown], shown
  assert all(k in shown for k in kept), shown


def test_third_party_log_records_and_tracebacks_are_redacted(tmp_path):
  import logging

  path = tmp_path / 'log'
  handler = logging.FileHandler(path)
  handler.setFormatter(logging.Formatter('%(name)s %(message)s'))
  redact.install([handler])
  logger = logging.getLogger('urllib3.connectionpool')
  ours = logging.getLogger('transforms.sources.pacs')
  for log in (logger, ours):
    log.addHandler(handler)
    log.propagate = False
  try:
    logger.warning('Retrying after %r: %s', 'x', '/studies/1.2.3.4.5/series/1.2.3.4.6')
    try:
      open('/nowhere/SCD0000101/1.dcm')
    except OSError:
      ours.exception('reading failed')  # ours: the message is kept
    ours.warning('%s: %s', 'dicoms/P1/1.dcm', ValueError("bad 'SCD0000102'"))
  finally:
    for log in (logger, ours):
      log.removeHandler(handler)
      log.propagate = True
    handler.close()
  logged = path.read_text()
  assert '1.2.3.4.5' not in logged and 'SCD0000101' not in logged, logged
  assert 'SCD0000102' not in logged and "dicoms/P1/1.dcm: bad '<10" in logged
  assert 'Retrying after' in logged and 'reading failed' in logged
  assert 'FileNotFoundError' in logged  # the traceback, redacted, is kept


def test_an_s3_run_with_retried_requests_shows_no_planted_identifier(
  planted_tree, tmp_path
):
  """The same planted tree on a real S3 server (moto), every slice's first
  GET and a listing refused with 503 (retried), one slice failing for
  good: no identifier in the dataset, the console or the log."""
  boto3 = pytest.importorskip('boto3')
  from tests import proxy, s3server

  _, root, manifest, planted, key = planted_tree
  bucket, pid = 'leaks', manifest.links[0][0]
  logs = str(tmp_path / 'logs')
  credentials = {'AWS_ACCESS_KEY_ID': 'test', 'AWS_SECRET_ACCESS_KEY': 'test'}
  with open(tmp_path / 'moto.log', 'w') as log, s3server.started(log) as (s3, _):
    client = boto3.client(
      's3', endpoint_url=s3, region_name='us-east-1', **_boto(credentials)
    )
    client.create_bucket(Bucket=bucket)
    for folder, _, names in os.walk(root):
      for name in names:
        path = os.path.join(folder, name)
        client.upload_file(path, bucket, f'IN/{os.path.relpath(path, root)}')
    rules = [
      '--fail',
      f'GET /{bucket}/IN/dicoms/=12',
      '--fail',
      f'GET /{bucket}?list-type=2=2',
      '--fail',
      f'GET /{bucket}/IN/dicoms/{pid}/2.dcm =-1',
    ]
    with proxy.started(s3, *rules) as (endpoint, figures):
      args = [
        '--input',
        f's3://{bucket}/IN',
        '--output',
        str(tmp_path / 'out'),
        f'--s3_endpoint_url={endpoint}',
        '--s3_region_name=us-east-1',
        '--request-attempts=3',
        '--pseudonymize-key-file',
        key,
      ]
      code, stdout, stderr = _run(args, _env(logs, **credentials))
    assert figures['faults'] >= 12, figures
  assert code == cli.EXIT_DROPPED, stderr.decode()[-2000:]
  out = str(tmp_path / 'out')
  errors = pq.read_table(os.path.join(out, schema.ERRORS_DIR)).to_pylist()
  assert [r for r in errors if r['stage'] == schema.STAGE_READ and '503' in r['error']]
  forbidden = identifiers(root, manifest) | planted
  assert not leaks(forbidden, _places(out, logs, stdout, stderr))


def _links(root: str) -> list[list[str]]:
  with open(os.path.join(root, layout.LINK_FILE), encoding='utf-8-sig') as f:
    return [line.split(',')[:2] for line in f.read().splitlines()[1:] if line]


def _boto(credentials: dict) -> dict:
  return {
    'aws_access_key_id': credentials['AWS_ACCESS_KEY_ID'],
    'aws_secret_access_key': credentials['AWS_SECRET_ACCESS_KEY'],
  }


def test_a_pacs_run_with_a_series_filter_and_a_dying_server_shows_no_identifier(
  tmp_path,
):
  """A planted tree's slices on a real Orthanc, chosen with the README's
  --series-filter SeriesInstanceUID=<uid>, the server killed mid-run so
  that requests are retried (urllib3 logs each retried URL) and then fail:
  no identifier, no stored UID in the dataset, the console or the log."""
  import pydicom

  from tests import orthanc, proxy
  from tests.test_dicomweb import _uploaded_tree
  from transforms.io import dicomweb

  orthanc.require()
  root = str(tmp_path / 'DATA')
  logs = str(tmp_path / 'logs')
  key = str(tmp_path / 'key')
  assert cli.command(['keygen', key]) == cli.EXIT_OK
  env = _env(
    logs,
    **{dicomweb.ENV_USERNAME: orthanc.USER, dicomweb.ENV_PASSWORD: orthanc.PASSWORD},
  )
  with orthanc.started(str(tmp_path / 'orthanc')) as server:
    manifest, _ = _uploaded_tree(
      server, root, 'LK', patients=3, slices=6, rows=8, columns=8, quirks=['phi']
    )
    planted = _plant(root)
    first = sorted(os.listdir(os.path.join(root, layout.DICOM_DIR)))[0]
    one = os.path.join(root, layout.DICOM_DIR, first, '1.dcm')
    series = pydicom.dcmread(one, stop_before_pixels=True).SeriesInstanceUID
    # Stopped once the pre-flight search, the three searches (a page, the
    # empty page that ends it and a series search, each) and a few
    # retrieves are answered: the rest are retried, then fetch rows.
    stop = ['--stop-after', '13', '--upstream-pid', str(server.pid)]
    with proxy.started(server.root, '--http', *stop) as (endpoint, _):
      args = [
        '--input',
        root,
        '--dicomweb-url',
        endpoint + '/dicom-web',
        '--output',
        str(tmp_path / 'out'),
        '--series-filter',
        f'SeriesInstanceUID={series}',
        '--read-concurrency',
        '1',
        '--request-attempts',
        '3',
        '--dicomweb-retrieve',
        dicomweb.INSTANCE,
        '--pseudonymize-key-file',
        key,
      ]
      code, stdout, stderr = _run(args, env)
  assert code == cli.EXIT_DROPPED, stderr.decode()[-2000:]
  out = str(tmp_path / 'out')
  tables = {
    name: pq.read_table(os.path.join(out, name)).to_pylist()
    for name in (schema.ERRORS_DIR, schema.RECONCILIATION_DIR)
  }
  fetches = [r for r in tables[schema.ERRORS_DIR] if r['stage'] == schema.STAGE_FETCH]
  filtered = [
    r
    for r in tables[schema.RECONCILIATION_DIR]
    if r['status'] == schema.MISSING_DICOMS and 'series-filter' in r['detail']
  ]
  assert fetches and len(filtered) == 2, tables
  assert keys.load(key).uid(series) in filtered[0]['detail']
  logged = ''.join(data.decode() for _, data in texts_under(logs))
  assert 'Retrying' in logged  # the retried URLs' lines, redacted
  forbidden = identifiers(root, manifest) | planted | {series}
  forbidden |= {value for line in _links(root) for value in line}
  assert not leaks(forbidden, _places(out, logs, stdout, stderr))


@pytest.mark.parametrize('planted', ['symlink', 'open folder', 'none'])
def test_the_log_folder_is_private_or_not_used(planted, tmp_path, monkeypatch):
  """The default log folder planted as a symbolic link (to a folder others
  may read) or left open to others is not used; a new one is 0700 and each
  log file 0600 from its first byte."""
  import logging
  import stat
  import tempfile

  from beam_pipeline.launch import console

  temp = tmp_path / 'tmp'
  temp.mkdir()
  victim = tmp_path / 'shared'
  victim.mkdir(mode=0o777)
  default = temp / f'cardiac-mri-logs-{os.getuid()}'
  if planted == 'symlink':
    default.symlink_to(victim)
  elif planted == 'open folder':
    default.mkdir()
    default.chmod(0o755)
  with monkeypatch.context() as m:
    m.delenv(console.LOG_DIR_VARIABLE, raising=False)
    m.setattr(tempfile, 'tempdir', str(temp))
    previous = os.umask(0o022)
    try:
      path = console.configure_logging()
      logging.getLogger('beam_pipeline.test').warning('a line')
    finally:
      os.umask(previous)
      for handler in logging.getLogger().handlers:
        handler.close()
  folder = os.path.dirname(path)
  assert not os.listdir(victim)
  if planted == 'none':
    assert folder == str(default)
  else:
    assert folder != str(default) and os.path.dirname(folder) == str(temp)
  assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert 'a line' in open(path).read()


def test_a_log_file_someone_made_first_is_never_written(tmp_path, monkeypatch):
  """Another user who guesses the log file's name (run-<second>-<pid>.log)
  and makes it first, readable by all, gets nothing: the run writes a new
  file of its own beside it."""
  import logging
  import stat

  from beam_pipeline.launch import console

  folder = tmp_path / 'logs'
  folder.mkdir()
  taken = folder / 'run-x.log'
  taken.write_text('')
  taken.chmod(0o666)
  try:
    path = console.configure_logging(str(taken))
    logging.getLogger('beam_pipeline.test').warning('a patient id')
  finally:
    for handler in logging.getLogger().handlers:
      handler.close()
  assert taken.read_text() == ''
  assert path != str(taken) and os.path.dirname(path) == str(folder)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert 'a patient id' in open(path).read()
