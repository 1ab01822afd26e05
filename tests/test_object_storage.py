"""Object storage: the same job with --input and --output on S3.

An S3-compatible server (moto's standalone server) runs on 127.0.0.1; the
generated tree is uploaded, the job reads and writes s3:// through Beam's
FileSystems, and the dataset is downloaded and compared with a local run.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from beam_pipeline import cli, sample
from tests.helpers import dataset_tables, free_port

boto3 = pytest.importorskip('boto3')

BUCKET = 'cardiac'
KEYS = [
  '--s3_access_key_id=test',
  '--s3_secret_access_key=test',
  '--s3_region_name=us-east-1',
]


@pytest.fixture(scope='module')
def s3_endpoint(tmp_path_factory):
  server = shutil.which('moto_server') or os.path.join(
    os.path.dirname(sys.executable), 'moto_server'
  )
  port = free_port()
  log = open(tmp_path_factory.mktemp('moto') / 'moto.log', 'w')
  process = subprocess.Popen(
    [server, '-H', '127.0.0.1', '-p', str(port)],
    stdout=log,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )
  endpoint = f'http://127.0.0.1:{port}'
  try:
    deadline = time.monotonic() + 60
    while True:
      with socket.socket() as s:
        if s.connect_ex(('127.0.0.1', port)) == 0:
          break
      assert process.poll() is None and time.monotonic() < deadline, (
        'moto did not start'
      )
      time.sleep(0.2)
    yield endpoint
  finally:
    process.terminate()
    process.wait(timeout=20)
    log.close()


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
  assert cli.main(['--input', root, '--output', local]) == cli.EXIT_QUARANTINED
  args = [
    '--input',
    f's3://{BUCKET}/DATA',
    '--output',
    f's3://{BUCKET}/OUT',
    f'--s3_endpoint_url={s3_endpoint}',
    *KEYS,
  ]
  assert cli.main(args) == cli.EXIT_QUARANTINED
  assert cli.main(args) == cli.EXIT_USAGE  # a dataset is there now
  downloaded = tmp_path / 'downloaded'
  listing = client.list_objects_v2(Bucket=BUCKET, Prefix='OUT/')['Contents']
  keys = [o['Key'] for o in listing]
  assert not [k for k in keys if '_incomplete' in k]
  assert 'OUT/_SUMMARY.json' in keys
  for key in keys:
    target = downloaded / key[len('OUT/') :]
    target.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(BUCKET, key, str(target))
  assert dataset_tables(str(downloaded)) == dataset_tables(local)


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
