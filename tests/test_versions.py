"""The living dataset: versions, history, vacuum, atomic commits, two writers,
and readers that are not ours (issue 32)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from beam_pipeline import dataset
from beam_pipeline.launch import cli, publish, run, vacuum
from beam_pipeline.tools import history, sample, verify
from tests import s3server
from tests.helpers import dataset_tables, fake_gcs
from transforms.contract import schema
from transforms.contract.errors import UsageError
from transforms.io import stores

KILLER = [sys.executable, '-m', 'tests.publish_killer']
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trees(tmp_path_factory):
  """Two small trees: the first version's input, and the grown one."""
  base = tmp_path_factory.mktemp('cohort')
  small, grown = str(base / 'SMALL'), str(base / 'GROWN')
  sample.make_tree(small, patients=2, slices=4, rows=16, columns=16)
  sample.make_tree(grown, patients=3, slices=5, rows=16, columns=16)
  return small, grown


def _run(*args) -> int:
  return cli.main(list(args))


def _keys(rows):
  return sorted((r['patient_id'], r['slice_index'], r['pixel_xxh3']) for r in rows)


def test_every_reader_takes_a_version_and_history_says_what_changed(
  trees, tmp_path, capsys
):
  small, _ = trees
  out = str(tmp_path / 'OUT')
  assert _run('--input', small, '--output', out, '--labeled-only') == cli.EXIT_OK
  first = dataset_tables(out)
  assert _run('--input', small, '--output', out) == cli.EXIT_OK
  latest = dataset_tables(out)
  assert len(latest['slices']) == 8 > len(first['slices'])
  assert dataset_tables(out, version=0) == first
  assert dataset.open_dataset(out, 0).count_rows() == len(first['slices'])
  batches = list(dataset.iter_batches(out, batch_size=64, version=0))
  assert sum(len(b['slice_index']) for b in batches) == len(first['slices'])
  rows = list(dataset.shuffled_rows(out, seed=1, version=0))
  assert _keys(rows) == _keys(first['slices'])
  assert verify.verify(out, version=0).failures == []
  assert dataset.read_reconciliation(out, 0).num_rows == len(first['reconciliation'])
  with pytest.raises(dataset.DatasetError, match='has no version 7'):
    dataset.open_dataset(out, 7)
  capsys.readouterr()
  assert history.main([out]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4 and lines[-1] == f'input: {small}'
  assert 'first version' in lines[1]
  assert 'patients +0 -0 ~2 =0' in lines[2]  # same patients, more rows each
  assert f'slices {len(first["slices"])} -> 8' in lines[2]
  assert 'options changed: labeled_only' in lines[2]
  assert history.main([out, '--json']) == 0
  found = json.loads(capsys.readouterr().out)
  assert [e['rows']['slices'] for e in found] == [len(first['slices']), 8]
  assert [e['options']['labeled_only'] for e in found] == [True, False]
  assert all(e['readable'] and e['input'] == small for e in found)
  assert history.main([str(tmp_path / 'nothing')]) == 2


def test_vacuum_keeps_what_the_retention_says_then_the_folder_is_the_latest(
  trees, tmp_path, capsys
):
  small, grown = trees
  out = str(tmp_path / 'OUT')
  assert _run('--input', small, '--output', out) == cli.EXIT_OK
  assert _run('--input', grown, '--output', out, '--overwrite') == cli.EXIT_OK
  # --full: every file replaced (an incremental run would keep version 1's)
  assert _run('--input', grown, '--output', out, '--full') == cli.EXIT_OK
  changes = [e['change'] for e in history.entries(out)]
  assert 'patients +1 -0 ~2 =0' in changes[1]  # one new, two with more slices
  assert 'patients +0 -0 ~0 =3' in changes[2]  # the same input again
  latest = dataset_tables(out)
  assert vacuum.vacuum(out, retain_hours=168) == []  # replaced a moment ago
  assert dataset_tables(out, version=0)['slices']
  assert vacuum.main([out, '--retain-hours', '0', '--dry-run']) == 0
  assert 'would remove 6 file(s)' in capsys.readouterr().out
  assert dataset_tables(out, version=0)['slices']  # a dry run removes nothing
  assert vacuum.main([out, '--retain-hours', '0']) == 0
  assert 'removed 6 file(s)' in capsys.readouterr().out
  # a plain Parquet reader of the folder now sees exactly the latest version
  for table, keys in (('slices', 'slice_index'), ('errors', 'path')):
    plain = pq.read_table(os.path.join(out, table)).to_pylist()
    assert sorted(map(str, (r[keys] for r in plain))) == sorted(
      map(str, (r[keys] for r in latest[table]))
    )
  assert dataset_tables(out) == latest
  with pytest.raises(dataset.DatasetError, match='is missing'):
    dataset.open_dataset(out, 0)
  found = history.entries(out)
  assert [e['readable'] for e in found] == [False, False, True]
  assert 'patients' not in found[2]['change']  # version 1's rows are gone
  assert vacuum.main([str(tmp_path / 'nothing')]) == 2
  capsys.readouterr()
  assert vacuum.main(['gs://bucket/OUT', '--retain-hours', '0']) == 2
  assert 'vacuum works on a local or s3:// output' in capsys.readouterr().err


def test_readers_that_are_not_ours_read_the_latest_and_an_older_version(
  trees, tmp_path
):
  """deltalake with pyarrow, Polars, pandas and DuckDB, with no code of ours."""
  duckdb = pytest.importorskip('duckdb')
  polars = pytest.importorskip('polars')
  from deltalake import DeltaTable

  small, grown = trees
  out = str(tmp_path / 'OUT')
  assert _run('--input', small, '--output', out) == cli.EXIT_OK
  assert _run('--input', grown, '--output', out, '--overwrite') == cli.EXIT_OK
  slices = os.path.join(out, schema.SLICES_DIR)
  for version in (0, 1):
    ours = _keys(dataset.open_dataset(out, version).to_table().to_pylist())
    delta = DeltaTable(slices, version=version)
    assert _keys(delta.to_pyarrow_table().to_pylist()) == ours
    frame = polars.read_delta(slices, version=version)
    assert _keys(frame.to_dicts()) == ours
    lazy = polars.scan_delta(slices, version=version).select(polars.len())
    assert lazy.collect().item() == len(ours)
    pandas = delta.to_pandas(columns=['patient_id', 'slice_index', 'pixel_xxh3'])
    assert _keys(pandas.to_dict('records')) == ours
    arrow = delta.to_pyarrow_dataset()  # noqa: F841 - DuckDB finds it by name
    found = duckdb.sql(
      'select patient_id, slice_index, pixel_xxh3 from arrow'
    ).fetchall()
    assert sorted(found) == ours
  assert DeltaTable(slices).version() == 1


def _capture(monkeypatch, stash, *args):
  """Runs the job and keeps its staged run instead of publishing it: the
  arguments of publish.publish (and the store configuration) as JSON, the
  staging folder moved to ``stash`` on a local disk."""
  captured = {}

  def keep(output, run_id, files, record, start, kept=None, removed=None):
    captured.update(
      output=output, run_id=run_id, files=files, record=record, start=start
    )
    captured.update(kept=kept, removed=removed)
    captured['config'] = dataclasses.asdict(stores._CONFIG)
    return -1

  with monkeypatch.context() as patched:
    patched.setattr(run.publish, 'publish', keep)
    code = _run(*args)
  assert code in (cli.EXIT_OK, cli.EXIT_DROPPED)
  staging = publish.staging_path(captured['output'], captured['run_id'])
  if stash is not None:
    shutil.move(staging, os.path.join(stash, os.path.basename(staging)))
  return captured


def _restore(captured, stash):
  name = os.path.basename(publish.staging_path(captured['output'], captured['run_id']))
  shutil.move(os.path.join(stash, name), os.path.join(captured['output'], name))


def test_two_writers_one_commits_the_other_stops_with_one_line(
  trees, tmp_path, monkeypatch, capsys
):
  """Two runs that both start from version 0 (the lock bypassed: the
  commit protocol must hold alone): the first commits version 1, the second
  is refused, exit 2, one line; the dataset is the first's, and the next run
  succeeds. The same for two first runs into an empty output."""
  small, grown = trees
  stash = str(tmp_path / 'stash')
  os.makedirs(stash)
  for first_run in (False, True):
    out = str(tmp_path / f'OUT-{first_run}')
    if not first_run:
      assert _run('--input', small, '--output', out) == cli.EXIT_OK
    one = _capture(monkeypatch, stash, '--input', grown, '--output', out, '--overwrite')
    two = _capture(monkeypatch, stash, '--input', small, '--output', out)
    assert one['start'] == two['start'] == (None if first_run else 0)
    _restore(one, stash)
    _restore(two, stash)
    one = {k: v for k, v in one.items() if k != 'config'}
    two = {k: v for k, v in two.items() if k != 'config'}
    made = publish.publish(**one)
    assert made == (0 if first_run else 1)
    with pytest.raises(UsageError, match='another run committed to') as refused:
      publish.publish(**two)
    assert '\n' not in str(refused.value)
    assert dataset.read_summary(out)['run_id'] == one['run_id']
    assert dataset_tables(out)['slices'] == dataset_tables(out, made)['slices']
    assert verify.verify(out).failures == []
    assert _run('--input', grown, '--output', out) == cli.EXIT_OK
    assert dataset.read_summary(out)['version'] == made + 1
    assert verify.verify(out).failures == []


def test_a_conflict_on_the_command_line_is_one_line_and_exit_two(
  trees, tmp_path, monkeypatch, capsys
):
  """A run that started before another made the table (its start version
  None, the table there by the time it commits) stops, exit 2, one line, and
  the other's version stands."""
  small, _ = trees
  out = str(tmp_path / 'OUT')
  assert _run('--input', small, '--output', out) == cli.EXIT_OK
  before = dataset_tables(out)
  monkeypatch.setattr(run.publish, 'start_of', lambda output: (None, None, None))
  capsys.readouterr()
  assert _run('--input', small, '--output', out) == cli.EXIT_USAGE
  errors = [x for x in capsys.readouterr().err.splitlines() if ' INFO ' not in x]
  (line,) = errors
  assert 'Traceback' not in line and line.startswith(
    f'error: --output {out}: another run committed to'
  )
  assert dataset_tables(out) == before and dataset.latest_version(out) == 0


def _published_state(out):
  """What a reader of ``out`` sees: each version's tables."""
  return {v: dataset_tables(out, v) for v in dataset.versions.versions(out)}


def _kill_points(captured, workdir):
  """Copies the output, runs the publish to the end there, returns its
  step count and how long it took."""
  trial = _retarget(captured, workdir, 'count')
  done = subprocess.run(
    [*KILLER, trial, '-1'], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.splitlines()[-1])['steps']


def _retarget(captured, workdir, name):
  """``captured`` made to publish into a fresh copy of its output (local)."""
  source = captured['output']
  target = os.path.join(workdir, name)
  shutil.copytree(source, target)
  text = json.dumps(captured).replace(source, target)
  path = os.path.join(workdir, f'{name}.json')
  with open(path, 'w') as f:
    f.write(text)
  return path


def _kill_trials(captured, workdir, instants):
  """The publish of ``captured`` run to its end in a copy of its output, then
  killed in fresh copies at each of its steps and at ``instants`` times
  0.05 s. Returns (the new version's tables, [(a killed copy, its exit
  code)])."""
  os.makedirs(workdir)
  steps = _kill_points(captured, workdir)
  assert steps >= 8, steps
  new = _published_state(os.path.join(workdir, 'count'))[1]
  points = [(k, False) for k in range(1, steps + 1)]
  points += [(0.05 * k, True) for k in range(1, instants + 1)]
  killed = []
  for n, (at, after) in enumerate(points):
    code = _killed(_retarget(captured, workdir, f'kill-{n}'), at, after)
    killed.append((os.path.join(workdir, f'kill-{n}'), code))
  return new, killed


def _killed(trial, at, after=False):
  args = [*KILLER, trial, str(at)] + (['--after'] if after else [])
  done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
  return done.returncode


def _check_after_kill(out, before, new, root):
  """The previous version is as it was; the latest is the old or the new one,
  whole; the next run succeeds."""
  state = _published_state(out)
  assert state[0] == before[0]
  assert verify.verify(out, version=0).failures == []
  assert set(state) in ({0}, {0, 1})
  if 1 in state:
    assert state[1] == new
  assert _run('--input', root, '--output', out, '--overwrite') == cli.EXIT_OK
  assert verify.verify(out).failures == []
  assert not [n for n in os.listdir(out) if n.startswith(schema.STAGING_DIR)]


def test_a_publish_killed_at_any_step_leaves_the_previous_version_readable(
  trees, tmp_path, monkeypatch
):
  """SIGKILL at every step of the publish (each file write, rename and
  delete, each commit's start and end) and at eight instants spread over its
  run time (inside deltalake's commits): version 0 is readable and identical
  row for row each time, and the next run succeeds."""
  small, grown = trees
  out = str(tmp_path / 'OUT')
  assert _run('--input', small, '--output', out) == cli.EXIT_OK
  before = _published_state(out)
  captured = _capture(
    monkeypatch, None, '--input', grown, '--output', out, '--overwrite'
  )
  new, killed = _kill_trials(captured, str(tmp_path / 'work'), 8)
  for copy, _ in killed:
    _check_after_kill(copy, before, new, grown)
  assert -9 in {code for _, code in killed}  # it was killed, at least somewhere


@pytest.fixture
def s3(tmp_path, monkeypatch):
  boto3 = pytest.importorskip('boto3')
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'test')
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'test')
  with open(tmp_path / 'moto.log', 'w') as log:
    with s3server.started(log) as (endpoint, _):
      client = boto3.client(
        's3',
        endpoint_url=endpoint,
        aws_access_key_id='test',
        aws_secret_access_key='test',
        region_name='us-east-1',
      )
      client.create_bucket(Bucket='cohort')
      yield endpoint, client


def _copy_prefix(client, source, target):
  listing = client.get_paginator('list_objects_v2').paginate(
    Bucket='cohort', Prefix=source + '/'
  )
  for page in listing:
    for item in page.get('Contents', ()):
      key = item['Key']
      client.copy_object(
        Bucket='cohort',
        Key=target + key[len(source) :],
        CopySource={'Bucket': 'cohort', 'Key': key},
      )


def _download(client, prefix, target):
  listing = client.get_paginator('list_objects_v2').paginate(
    Bucket='cohort', Prefix=prefix + '/'
  )
  for page in listing:
    for item in page.get('Contents', ()):
      path = os.path.join(target, item['Key'][len(prefix) + 1 :])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      client.download_file('cohort', item['Key'], path)
  return target


def test_a_publish_to_s3_killed_at_any_step_leaves_the_previous_version(
  trees, tmp_path, monkeypatch, s3
):
  endpoint, client = s3
  small, grown = trees
  common = [f'--s3_endpoint_url={endpoint}', '--s3_region_name=us-east-1']
  out = 's3://cohort/OUT'
  assert _run('--input', small, '--output', out, *common) == cli.EXIT_OK
  before = _published_state(_download(client, 'OUT', str(tmp_path / 'before')))
  captured = _capture(
    monkeypatch, None, '--input', grown, '--output', out, '--overwrite', *common
  )
  work = str(tmp_path / 'work')
  os.makedirs(work)

  def trial(name):
    _copy_prefix(client, 'OUT', name)
    path = os.path.join(work, f'{name}.json')
    with open(path, 'w') as f:
      f.write(json.dumps(captured).replace(out, f's3://cohort/{name}'))
    return path

  done = subprocess.run(
    [*KILLER, trial('count'), '-1'], cwd=ROOT, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr
  steps = json.loads(done.stdout.splitlines()[-1])['steps']
  new = _published_state(_download(client, 'count', str(tmp_path / 'count')))[1]
  points = [(k, False) for k in range(1, steps + 1, max(1, steps // 12))]
  points += [(0.1 * k, True) for k in range(1, 5)]
  for n, (at, after) in enumerate(points):
    name = f'kill-{n}'
    _killed(trial(name), at, after)
    local = _download(client, name, str(tmp_path / name))
    state = _published_state(local)
    assert state[0] == before[0], (at, after)
    assert set(state) in ({0}, {0, 1}) and state.get(1, new) == new
    again = f's3://cohort/{name}'
    assert _run('--input', grown, '--output', again, '--overwrite', *common) == 0
    copy = _download(client, name, str(tmp_path / f'{name}-again'))
    assert verify.verify(copy).failures == []


@pytest.fixture
def gcs(tmp_path):
  pytest.importorskip('google.cloud.storage')
  from google.cloud import storage

  with open(tmp_path / 'fake-gcs.log', 'wb') as log, fake_gcs(log):
    stores.configure(stores.StoreConfig())
    yield storage.Client(project='test').create_bucket('cohort-gcs')


def test_a_publish_to_gcs_killed_at_any_step_leaves_the_previous_version(
  trees, tmp_path, monkeypatch, gcs
):
  small, grown = trees
  out = 'gs://cohort-gcs/OUT'

  def copy(source, target):
    for blob in gcs.client.list_blobs(gcs, prefix=source + '/'):
      gcs.copy_blob(blob, gcs, target + blob.name[len(source) :])

  def download(prefix, target):
    for blob in gcs.client.list_blobs(gcs, prefix=prefix + '/'):
      path = os.path.join(target, blob.name[len(prefix) + 1 :])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      blob.download_to_filename(path)
    return target

  assert _run('--input', small, '--output', out) == cli.EXIT_OK
  before = _published_state(download('OUT', str(tmp_path / 'before')))
  captured = _capture(
    monkeypatch, None, '--input', grown, '--output', out, '--overwrite'
  )
  work = str(tmp_path / 'work')
  os.makedirs(work)

  def trial(name):
    copy('OUT', name)
    path = os.path.join(work, f'{name}.json')
    with open(path, 'w') as f:
      f.write(json.dumps(captured).replace(out, f'gs://cohort-gcs/{name}'))
    return path

  done = subprocess.run(
    [*KILLER, trial('count'), '-1'], cwd=ROOT, capture_output=True, text=True
  )
  assert done.returncode == 0, done.stderr
  steps = json.loads(done.stdout.splitlines()[-1])['steps']
  new = _published_state(download('count', str(tmp_path / 'count')))[1]
  points = [(k, False) for k in range(1, steps + 1, max(1, steps // 10))]
  points += [(0.1 * k, True) for k in range(1, 4)]
  for n, (at, after) in enumerate(points):
    name = f'kill-{n}'
    _killed(trial(name), at, after)
    state = _published_state(download(name, str(tmp_path / name)))
    assert state[0] == before[0], (at, after)
    assert set(state) in ({0}, {0, 1}) and state.get(1, new) == new
    again = f'gs://cohort-gcs/{name}'
    assert _run('--input', grown, '--output', again, '--overwrite') == 0
    copied = download(name, str(tmp_path / f'{name}-again'))
    assert verify.verify(copied).failures == []
