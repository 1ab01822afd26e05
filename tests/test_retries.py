"""Retries that do what the docs say, through the fault-injecting proxy
(tests/proxy.py) in front of a real Orthanc, moto's S3 and fake-gcs-server.

- An answer whose body breaks off part-way is asked for again: a search
  page, an instance, a whole series (its parts already read passed over),
  and an object read from S3 or GCS; a body cut on every attempt is an
  error, never a shorter file.
- ``Retry-After`` is honoured up to ``http.RETRY_AFTER_CAP``, with a warning
  when the server asks for longer.
- SIGTERM and SIGINT end a real ``python run_pipeline.py`` within seconds,
  whatever its workers wait on (a server that never answers, a retry told
  to wait an hour): the interrupted exit code, one line, no traceback, no
  process left, nothing published; and so does a burst of them, the later
  ones arriving while the first is handled.

Without Orthanc (or moto, or fake-gcs-server) these tests skip; under CI
(CI=true) they fail.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from beam_pipeline.dataset import read_summary
from beam_pipeline.launch import cli, lock
from tests import orthanc, proxy
from tests.helpers import dataset_tables
from tests.test_dicomweb import _uploaded_tree
from transforms.contract import metrics
from transforms.io import dicomweb, http, protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_patient(pacs, root, prefix, slices=6):
  """A one-patient tree uploaded to ``pacs``: (patient, its instances)."""
  _uploaded_tree(pacs, root, prefix, patients=1, slices=slices, rows=8, columns=8)
  (patient,) = os.listdir(os.path.join(root, 'dicoms'))
  client = dicomweb.DicomWebClient(dicomweb.DicomWebConfig(pacs.dicomweb))
  return patient, list(client.search(patient))


def _fetches(out):
  counters = read_summary(out)['counters']
  return tuple(counters.get(name, 0) for name in metrics.PACS_FETCHES)


def _pacs_run(endpoint, root, out, *more):
  args = ['--input', root, '--dicomweb-url', endpoint + '/dicom-web', '--output', out]
  return cli.main([*args, '--request-attempts', '3', *more])


# What is cut: (a request line's part, the retrieve mode, what the summary's
# counters must say: streamed, retrieved alone, series answers incomplete).
CUTS = {
  'an instance': (lambda p, i: f'/instances/{i[3].sop} ', 'instance', (0, 6, 0)),
  'a series, asked for again': (
    lambda p, i: f'/series/{i[0].series} ',
    'series',
    (6, 0, 0),
  ),
  'a search page': (lambda p, i: f'PatientID={p}&', 'series', (6, 0, 0)),
}


@pytest.mark.parametrize('cut', CUTS)
def test_a_body_cut_mid_way_then_a_good_answer_loses_nothing(
  pacs, credentials, tmp_path, cut
):
  root = str(tmp_path / 'DATA')
  prefix = f'CUT{list(CUTS).index(cut)}'
  patient, instances = _one_patient(pacs, root, prefix)
  pattern, mode, fetches = CUTS[cut]
  rule = ['--cut', f'{pattern(patient, instances)}=1']
  out = str(tmp_path / 'OUT')
  with proxy.started(pacs.root, *rule) as (endpoint, figures):
    code = _pacs_run(endpoint, root, out, '--dicomweb-retrieve', mode)
  assert figures['faults'] == 1
  assert code == cli.EXIT_OK
  tables = dataset_tables(out)
  assert sorted(r['slice_index'] for r in tables['slices']) == [1, 2, 3, 4, 5, 6]
  assert tables['errors'] == []
  assert _fetches(out) == fetches


def test_a_body_cut_on_every_attempt_is_a_fetch_row(pacs, credentials, tmp_path):
  root = str(tmp_path / 'DATA')
  _, instances = _one_patient(pacs, root, 'CUTALL')
  (victim,) = [i for i in instances if i.number == '2']
  out = str(tmp_path / 'OUT')
  with proxy.started(pacs.root, '--cut', f'/instances/{victim.sop} =-1') as (
    endpoint,
    figures,
  ):
    code = _pacs_run(endpoint, root, out, '--dicomweb-retrieve', 'instance')
  assert code == cli.EXIT_DROPPED and figures['faults'] == 3
  tables = dataset_tables(out)
  assert sorted(r['slice_index'] for r in tables['slices']) == [1, 3, 4, 5, 6]
  (row,) = tables['errors']
  assert row['stage'] == 'fetch' and victim.sop in row['path']
  assert row['error'].startswith('cannot retrieve: the answer broke off 3 times')


def _events(path):
  """The proxy's --events lines: [(monotonic time, kind, request line)]."""
  with open(path, encoding='utf-8') as f:
    return [tuple(line.rstrip('\n').split(' ', 2)) for line in f]


def test_a_retry_after_of_an_hour_waits_the_cap_and_warns(
  pacs, credentials, tmp_path, capsys, monkeypatch
):
  """The cap made 3 s here (30 s in a run): the series' retrieve, answered
  503 with Retry-After: 3600 twice, is asked again the cap after each 503
  (measured between the two 503s, as the proxy saw them), not an hour; one
  warning for the run, whatever an earlier test warned of."""
  cap = 3.0
  monkeypatch.setattr(http, 'RETRY_AFTER_CAP', cap)
  monkeypatch.setattr(http, '_long_retry_after', http._Warned())
  root = str(tmp_path / 'DATA')
  _, instances = _one_patient(pacs, root, 'WAIT')
  series = f'/series/{instances[0].series} '
  events = str(tmp_path / 'events')
  rules = ['--fail', f'{series}=2', '--retry-after', '3600', '--events', events]
  out = str(tmp_path / 'OUT')
  with proxy.started(pacs.root, *rules) as (endpoint, figures):
    code = _pacs_run(endpoint, root, out)
  assert code == cli.EXIT_OK and figures['faults'] == 2
  (first, second) = _events(events)
  assert first[1:] == second[1:] and first[1] == 'fail' and series in first[2]
  gap = float(second[0]) - float(first[0])
  # At least the cap; far less than the hour asked (the slack: a loaded machine)
  assert cap <= gap < cap + 20, gap
  assert len(dataset_tables(out)['slices']) == 6
  assert _fetches(out) == (6, 0, 0)
  warned = [
    line for line in capsys.readouterr().err.splitlines() if 'Retry-After' in line
  ]
  assert len(warned) == 1
  assert 'asked to wait 3600 s' in warned[0] and 'waiting 3 s' in warned[0]


def test_a_long_retry_after_is_warned_of_once_a_run(caplog, monkeypatch):
  """Warned once in a run; a new run (its handlers installed) warns again."""
  from beam_pipeline.launch import interrupts

  monkeypatch.setattr(http, '_long_retry_after', http._Warned())
  caplog.set_level('DEBUG', logger=http.__name__)

  def warnings():
    return [r for r in caplog.records if r.levelname == 'WARNING']

  assert http.pause(1, 3600.0) == http.pause(2, 90.0) == http.RETRY_AFTER_CAP
  assert len(warnings()) == 1 and 'asked to wait 3600 s' in warnings()[0].getMessage()
  saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    interrupts.handle_signals()  # where a run starts
  finally:
    for signum, handler in saved.items():
      signal.signal(signum, handler)
  http.pause(1, 120.0)
  assert len(warnings()) == 2 and 'asked to wait 120 s' in warnings()[1].getMessage()


def test_retry_waits_follow_the_documented_figures():
  assert http.RETRY_AFTER_CAP == 30  # docs/SOURCES.md, "Retries"
  assert http.pause(1, 3600.0) == 30 and http.pause(3, 2.5) == 2.5
  assert http.retry_after('120') == 120 and http.retry_after(' 7 ') == 7
  assert http.retry_after('Wed, 21 Oct 2015 07:28:30 GMT', now=1445412480) == 30
  assert http.retry_after('soon') is None and http.retry_after(None) is None
  # Digits Python's str.isdigit takes but int() and float() refuse, or that
  # are not the ASCII digits HTTP's delay-seconds is made of
  for odd in ('²', '1²', '٣', '３', '-5', '1.5', '1e3', ''):
    assert http.retry_after(odd) is None, odd
  assert http.pause(1, http.retry_after('9' * 400)) == 30  # no overflow
  assert http.backoff(1) == 0
  for retry, low in ((2, 0.2), (3, 0.4), (4, 0.8), (9, 20)):
    assert low <= http.backoff(retry) <= min(20, low + 0.5)


# What the run waits on when the signal comes: (the request that is never
# answered, or answered 503 "Retry-After: 3600" every time; the signal).
STUCK = {
  'a search never answered, SIGTERM': (['--hang', 'PatientID=-1'], signal.SIGTERM),
  'a retrieve never answered, SIGINT': (['--hang', '/series/=-1'], signal.SIGINT),
  'a search told to retry in an hour, SIGTERM': (
    ['--fail', 'PatientID=-1', '--retry-after', '3600'],
    signal.SIGTERM,
  ),
}


def _session(sid: int) -> list[int]:
  """The processes of session ``sid`` still running."""
  found = []
  for name in os.listdir('/proc'):
    if name.isdigit():
      try:
        with open(f'/proc/{name}/stat', 'rb') as f:
          fields = f.read().rsplit(b')', 1)[1].split()
      except OSError:
        continue
      if int(fields[3]) == sid and fields[0] != b'Z':
        found.append(int(name))
  return found


# Within seconds: what the run would wait on otherwise is far longer, a
# read of 60 s (http.READ_TIMEOUT) or a Retry-After cut to 30 s (less the
# second the signal comes after), then the next attempt.
WITHIN = 20.0


def _stuck_run(pacs, tmp_path, prefix, faults, signals, *more):
  """``python run_pipeline.py`` of a 2-patient PACS tree, behind a proxy
  with ``faults``, sent ``signals(process)`` (which sends the signals) a
  second after the first fault; (process, stdout, stderr, seconds from the
  first signal to the exit, output folder)."""
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, prefix, patients=2, slices=3, rows=8, columns=8)
  events = str(tmp_path / 'events')
  out = str(tmp_path / 'OUT')
  env = dict(
    os.environ,
    CI='',
    **{dicomweb.ENV_USERNAME: orthanc.USER, dicomweb.ENV_PASSWORD: orthanc.PASSWORD},
  )
  with proxy.started(pacs.root, *faults, '--events', events) as (endpoint, _):
    run = subprocess.Popen(
      [
        sys.executable,
        'run_pipeline.py',
        '--input',
        root,
        '--dicomweb-url',
        endpoint + '/dicom-web',
        '--output',
        out,
        *more,
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      start_new_session=True,
    )
    try:
      deadline = time.monotonic() + 120
      while not (os.path.exists(events) and os.path.getsize(events)):
        assert run.poll() is None, run.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, 'the fault never came'
        time.sleep(0.1)
      time.sleep(1)  # well inside the wait: the read, or the retry's sleep
      sent = time.monotonic()
      signals(run)
      stdout, stderr = run.communicate(timeout=90)
      took = time.monotonic() - sent
    finally:
      if run.poll() is None:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
  return run, stdout.decode(), stderr.decode(), took, out


def _ended_as_interrupted(run, stdout, stderr, took, out, signum):
  """The checks every interrupted run passes: its exit code and one line,
  within seconds, nothing left or published."""
  assert min(http.READ_TIMEOUT, http.RETRY_AFTER_CAP - 1) > WITHIN  # far longer
  name = signal.Signals(signum).name
  assert run.returncode == 128 + signum, stderr[-2000:]
  assert took < WITHIN, took
  lines = stderr.splitlines()
  assert (
    lines[-1] == f'interrupted ({name}): nothing published, previous dataset untouched'
  )
  assert 'Traceback' not in stderr and 'Traceback' not in stdout
  assert _session(run.pid) == []  # no worker or decoder left behind
  assert not os.path.exists(os.path.join(out, 'slices'))  # nothing published
  assert not os.path.exists(os.path.join(out, lock.LOCK_FILE))


@pytest.mark.parametrize('stuck', STUCK)
def test_a_signal_ends_a_run_stuck_on_the_server_within_seconds(pacs, tmp_path, stuck):
  faults, signum = STUCK[stuck]
  ended = _stuck_run(
    pacs,
    tmp_path,
    f'SIG{list(STUCK).index(stuck)}',
    faults,
    lambda run: run.send_signal(signum),
  )
  _ended_as_interrupted(*ended, signum)


def test_a_burst_of_signals_while_the_first_is_handled_ends_the_run_as_one(
  pacs, tmp_path
):
  """SIGTERM, then SIGINT and SIGTERM every few milliseconds until the
  process is gone, while the run waits on a search never answered and holds
  an id map's parts: one signal's exit code and its line, no traceback,
  nothing left beside the id map (its parts, staged map and lock removed)."""
  from beam_pipeline.tools import keys

  secrets = tmp_path / 'secrets'
  secrets.mkdir()
  key, id_map = str(secrets / 'key'), str(secrets / 'ids.csv')
  keys.generate(key)

  def burst(run):
    run.send_signal(signal.SIGTERM)
    until = time.monotonic() + 10
    while run.poll() is None and time.monotonic() < until:
      for again in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ProcessLookupError):
          run.send_signal(again)
        time.sleep(0.003)

  ended = _stuck_run(
    pacs,
    tmp_path,
    'BURST',
    ['--hang', 'PatientID=-1'],
    burst,
    '--pseudonymize-key-file',
    key,
    '--id-map',
    id_map,
  )
  # The first signal Python handles raises: SIGINT's handler runs before
  # SIGTERM's when both arrived before the main thread could run either.
  first = ended[0].returncode - 128
  assert first in (signal.SIGINT, signal.SIGTERM), ended[2][-2000:]
  _ended_as_interrupted(*ended, first)
  assert os.listdir(secrets) == ['key']


@pytest.fixture(scope='module')
def s3_server(tmp_path_factory):
  pytest.importorskip('boto3')
  from tests import s3server

  with open(tmp_path_factory.mktemp('moto') / 'moto.log', 'w') as log:
    with s3server.started(log) as (endpoint, _):
      yield endpoint


@pytest.fixture(scope='module')
def gcs_server(tmp_path_factory):
  from tests.helpers import fake_gcs

  with open(tmp_path_factory.mktemp('gcs') / 'fake-gcs.log', 'wb') as log:
    with fake_gcs(log) as server:
      yield server.url


DATA = bytes(range(256)) * 4096  # 1 MiB, every byte value
KEY = 'DATA/dicoms/P1/1.dcm'


def _put(kind, upstream):
  """Stores DATA at KEY of bucket ``cut``; the request line part that
  names it."""
  if kind == 's3':
    import boto3

    client = boto3.client('s3', endpoint_url=upstream, region_name='us-east-1')
    if not any(b['Name'] == 'cut' for b in client.list_buckets()['Buckets']):
      client.create_bucket(Bucket='cut')
    client.put_object(Bucket='cut', Key=KEY, Body=DATA)
    return f'GET /cut/{KEY} '
  from google.cloud import storage

  client = storage.Client.create_anonymous_client()
  bucket = client.bucket('cut')
  if not bucket.exists():
    client.create_bucket('cut')
  bucket.blob(KEY).upload_from_string(DATA)
  return KEY.replace('/', '%2F')


def _store(kind, endpoint, monkeypatch):
  """A store of ``kind`` whose requests go to ``endpoint``; the path of KEY."""
  config = protocol.StoreConfig(
    s3_endpoint_url=endpoint, s3_region='us-east-1', attempts=3
  )
  if kind == 's3':
    from transforms.io import s3

    return s3.S3Store(config), f's3://cut/{KEY}'
  from transforms.io import gcs

  monkeypatch.setenv('STORAGE_EMULATOR_HOST', endpoint)
  return gcs.GcsStore(config), f'gs://cut/{KEY}'


@pytest.mark.parametrize('limit', [None, 2 * len(DATA)])
@pytest.mark.parametrize('kind', ['s3', 'gcs'])
def test_an_object_read_cut_mid_way_is_read_again_and_never_short(
  kind, limit, request, monkeypatch
):
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'test')
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'test')
  upstream = request.getfixturevalue(f'{kind}_server')
  pattern = _put(kind, upstream)
  with proxy.started(upstream, '--cut', f'{pattern}=1') as (endpoint, figures):
    store, path = _store(kind, endpoint, monkeypatch)
    assert store.read(path, limit) == DATA
  assert figures['faults'] == 1 and figures['requests'] >= 2
  if kind == 'gcs':  # its default retry goes on for 120 s: not waited for here
    return
  with proxy.started(upstream, '--cut', f'{pattern}=-1') as (endpoint, figures):
    store, path = _store(kind, endpoint, monkeypatch)
    with pytest.raises(OSError):
      store.read(path, limit)
  assert figures['faults'] == figures['requests'] == 3  # --request-attempts


def test_a_series_answer_cut_part_way_is_asked_for_again_each_instance_once(
  tmp_path,
):
  import random
  import threading

  from tests.test_series import _body, _instance_bytes, _reader
  from transforms.decode import series

  files = _instance_bytes(tmp_path, 8)
  uids = list(files)
  kind = 'multipart/related; type="application/dicom"; boundary=xB0'
  whole = _body([files[u] for u in uids])
  shuffled = uids[:]
  random.Random(3).shuffle(shuffled)

  def dropping(data, after):  # the connection drops after ``after`` bytes
    read = _reader(data[:after], step=2000)

    def read_or_drop(n):
      return read(n) or (_ for _ in ()).throw(http.BodyError('connection reset'))

    return read_or_drop

  answers = [  # the server's answers, in turn (each read afresh)
    lambda: _reader(whole[: len(whole) // 3], step=2000),  # ends early
    lambda: dropping(_body([files[u] for u in shuffled]), len(whole) * 2 // 3),
    lambda: _reader(_body([files[u] for u in reversed(uids)]), step=2000),
  ]
  opened, ends = [], []

  def open_series():
    opened.append(True)
    return answers[len(opened) - 1](), kind, lambda: None

  def stream(attempts):
    opened.clear()
    ends.clear()
    return series.SeriesStream(
      open_series,
      uids,
      None,
      series.Budget(10**9),
      threading.BoundedSemaphore(1),
      ends.append,
      attempts=attempts,
    )

  got = stream(3)
  assert [got.take(u) for u in uids] == [files[u] for u in uids]
  assert len(opened) == 3 and ends == [None] and got.streamed == 8
  got.close()

  got = stream(2)  # two answers cut: what they brought, the rest retrieved alone
  taken = [got.take(u) for u in uids]
  assert len(opened) == 2 and ends == ['connection reset']
  assert all(t is None or t == files[u] for t, u in zip(taken, uids, strict=True))
  assert 0 < sum(t is not None for t in taken) < 8
  got.close()

  second = whole.index(b'--xB0\r\n', 10)
  malformed = whole[:second] + b'--xB0 and other text\r\n' + whole[second + 7 :]
  answers[0] = lambda: _reader(malformed, step=2000)
  got = stream(3)  # malformed after its first part, not cut: not asked again
  assert [got.take(u) for u in uids] == [files[uids[0]]] + [None] * 7
  assert len(opened) == 1 and ends and 'followed by other text' in ends[0]
  got.close()
