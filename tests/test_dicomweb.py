"""Slices from a PACS: --dicomweb-url against a real Orthanc server.

Orthanc (Debian's orthanc + orthanc-dicomweb) runs on 127.0.0.1 on a free
port with authentication on, started by tests/orthanc.py and stopped by its
pid. A generated tree's slices are uploaded with POST /instances; link.csv
and contourfiles/ stay in the tree. Without Orthanc these tests skip, and
under CI (CI=true) they fail.
"""

import glob
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pydicom
import pytest

from beam_pipeline.dataset import read_summary
from beam_pipeline.launch import cli
from beam_pipeline.tools import keys, sample, verify
from tests import orthanc, proxy
from tests.helpers import (
  dataset_tables,
  identifiers,
  leaks,
  parquet_text,
  set_tags,
  texts_under,
)
from transforms.contract import layout, metrics, schema
from transforms.io import dicomweb
from transforms.sources import pacs as pacs_stage

QUIRKS = [
  'missing_contours',
  'missing_dicoms',
  'unlinked_dicoms',
  'unlinked_contours',
  'contour_without_dicom',
  'duplicate_link',
  'malformed_link',
  'stray_files',
  'truncated_dicom',
  'not_dicom',
  'bad_contour',
  'short_contour',
]


def _uploaded_tree(server, root, prefix, **kwargs):
  """A tree whose patient ids start with ``prefix`` (each test its own
  patients on the shared server), its slices uploaded; the files Orthanc
  refused are removed from the tree, so a tree run sees what the PACS holds."""
  manifest = sample.make_tree(root, **kwargs)
  _rename_patients(root, prefix)
  _, refused = orthanc.upload_tree(server, root)
  for relative in refused:
    os.remove(os.path.join(root, relative))
  return manifest, refused


def _rename_patients(root, prefix):
  """Prefixes every patient id (link.csv, folder names, PatientID) and
  derives new UIDs from the old ones and the prefix: Orthanc keys instances
  by their UIDs, and the tests share one server."""
  links = os.path.join(root, 'link.csv')
  with open(links, encoding='utf-8-sig') as f:
    text = f.read()
  for folder in sorted(os.listdir(os.path.join(root, 'dicoms'))):
    text = text.replace(folder, prefix + folder)
    for path in glob.glob(os.path.join(root, 'dicoms', folder, '*.dcm')):
      try:
        ds = pydicom.dcmread(path)
      except Exception:  # a broken quirk: left as it is
        continue
      ds.PatientID = prefix + folder
      for keyword in ('StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID'):
        old = getattr(ds, keyword)
        setattr(ds, keyword, pydicom.uid.generate_uid(entropy_srcs=[prefix, old]))
      ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
      ds.save_as(path)
    os.rename(
      os.path.join(root, 'dicoms', folder),
      os.path.join(root, 'dicoms', prefix + folder),
    )
  with open(links, 'w', encoding='utf-8') as f:
    f.write(text)


def _pacs_args(url, root, out, *more):
  """The command line of a run of ``root`` with its slices from ``url``."""
  return ['--input', root, '--dicomweb-url', url, '--output', out, *more]


def _run_pipeline(args, env):
  """run_pipeline.py with ``args`` in a process of its own (bytes out)."""
  return subprocess.run(
    [sys.executable, 'run_pipeline.py', *args],
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    capture_output=True,
    env=env,
    timeout=300,
  )


def _without_paths(tables):
  slices = [dict(r, dicom_path=None) for r in tables['slices']]
  return sorted(slices, key=lambda r: (r['patient_id'], r['slice_index']))


def _fetches(out):
  """(instances from series retrieves, instances retrieved alone, series
  retrieves that ended early) of a run, from its summary's counters."""
  counters = read_summary(out)['counters']
  return tuple(counters.get(name, 0) for name in metrics.PACS_FETCHES)


# How the slices are retrieved: --dicomweb-retrieve, and a --max-chunk-bytes
# so small that a series' answer must let most instances go (each then
# retrieved alone) while others are taken from it.
MODES = {
  'series': [],
  'instance': ['--dicomweb-retrieve', 'instance'],
  'series, small budget': ['--max-chunk-bytes', '4000'],
}


@pytest.mark.parametrize('mode', MODES)
def test_a_pacs_gives_the_tree_dataset(pacs, credentials, tmp_path, capsys, mode):
  root = str(tmp_path / 'DATA')
  prefix = 'EQ' + str(list(MODES).index(mode))
  _, refused = _uploaded_tree(
    pacs, root, prefix, patients=3, slices=8, rows=24, columns=20, quirks=QUIRKS
  )
  assert refused  # the broken slices: Orthanc stores only DICOM
  tree_out, pacs_out = str(tmp_path / 'tree'), str(tmp_path / 'pacs')
  assert cli.main(['--input', root, '--output', tree_out]) == cli.EXIT_DROPPED
  capsys.readouterr()
  code = cli.main(_pacs_args(pacs.dicomweb, root, pacs_out, *MODES[mode]))
  assert code == cli.EXIT_DROPPED
  assert (
    'dicoms is ignored: the slices come from --dicomweb-url' in capsys.readouterr().err
  )
  tree, pacs_tables = dataset_tables(tree_out), dataset_tables(pacs_out)
  assert len(tree['slices']) > 10
  streamed, alone, incomplete = _fetches(pacs_out)
  unusable = [  # fetched, and then found unusable
    r
    for r in pacs_tables['errors']
    if r['path'].startswith('studies/') and r['stage'] != schema.STAGE_SEARCH
  ]
  assert streamed + alone == len(pacs_tables['slices']) + len(unusable)
  assert incomplete == 0
  if mode == 'series':
    assert alone == 0
  elif mode == 'instance':
    assert streamed == 0
  else:
    assert streamed > 0 and alone > 0
  assert _without_paths(pacs_tables) == _without_paths(tree)
  for row in pacs_tables['slices']:
    assert row['dicom_path'].startswith('studies/')
    assert '/series/' in row['dicom_path'] and '/instances/' in row['dicom_path']

  def statuses(rows, dropped):
    return sorted(
      (r['patient_id'], r['original_id'], r['status'])
      for r in rows
      if r['status'] not in dropped
    )

  # unlinked_dicoms is not computed for a PACS: nothing searches for them.
  assert statuses(pacs_tables['reconciliation'], ()) == statuses(
    tree['reconciliation'], (schema.UNLINKED_DICOMS,)
  )
  assert any(
    r['status'] == schema.MISSING_DICOMS for r in pacs_tables['reconciliation']
  )

  def errors(rows):  # the tree's stray files under dicoms/ never reach a PACS
    return sorted(
      (r['patient_id'], r['stage'], r['error'])
      for r in rows
      if not (r['stage'] == schema.STAGE_LIST and r['path'].startswith('dicoms/'))
    )

  assert errors(pacs_tables['errors']) == errors(tree['errors'])
  assert any(r['stage'] == schema.STAGE_CONTOUR for r in pacs_tables['errors'])


def _instances(server, patient_id):
  client = dicomweb.DicomWebClient(dicomweb.DicomWebConfig(server.dicomweb))
  return list(client.search(patient_id))


def _upload_copy(server, path, tmp_path, **changes):
  """Uploads a copy of the slice at ``path`` with ``changes`` (keyword: value;
  None deletes) and a new SOP Instance UID."""
  ds = set_tags(pydicom.dcmread(path), **changes)
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
    pydicom.uid.generate_uid()
  )
  target = str(tmp_path / f'{ds.SOPInstanceUID}.dcm')
  ds.save_as(target)
  assert orthanc.upload(server, target)


def test_a_patient_with_two_series_is_ambiguous_until_a_filter_chooses(
  pacs, credentials, tmp_path
):
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, 'TWO', patients=2, slices=4, rows=8, columns=8)
  patient = sorted(os.listdir(os.path.join(root, 'dicoms')))[0]
  second = pydicom.uid.generate_uid()
  for path in sorted(glob.glob(os.path.join(root, 'dicoms', patient, '*.dcm'))):
    _upload_copy(
      pacs, path, tmp_path, SeriesInstanceUID=second, SeriesDescription='Localizer'
    )
  first = {i.series for i in _instances(pacs, patient)} - {second}
  assert len(first) == 1

  out = str(tmp_path / 'ambiguous')
  assert cli.main(_pacs_args(pacs.dicomweb, root, out)) == cli.EXIT_DROPPED
  tables = dataset_tables(out)
  (row,) = [r for r in tables['reconciliation'] if r['patient_id'] == patient]
  assert row['status'] == schema.AMBIGUOUS_SERIES
  assert second in row['detail'] and first.pop() in row['detail']
  assert patient not in {r['patient_id'] for r in tables['slices']}
  assert len(tables['slices']) == 4  # the other patient's

  chosen = str(tmp_path / 'chosen')
  args = _pacs_args(
    pacs.dicomweb, root, chosen, '--series-filter', 'SeriesDescription=loc*'
  )
  assert cli.main(args) == cli.EXIT_DROPPED
  tables = dataset_tables(chosen)
  rows = [r for r in tables['slices'] if r['patient_id'] == patient]
  assert sorted(r['slice_index'] for r in rows) == [1, 2, 3, 4]
  assert all(f'/series/{second}/' in r['dicom_path'] for r in rows)
  assert len(tables['slices']) == 4
  # The filter applies to every patient: the other one has no such series.
  (other,) = [r for r in tables['reconciliation'] if r['patient_id'] != patient]
  assert other['status'] == schema.MISSING_DICOMS
  assert 'none of the 1 series' in other['detail']
  assert 'SeriesDescription=loc*' in other['detail']


def test_instances_without_or_sharing_an_instance_number_are_error_rows(
  pacs, credentials, tmp_path
):
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, 'NUM', patients=1, slices=5, rows=8, columns=8)
  (patient,) = os.listdir(os.path.join(root, 'dicoms'))
  folder = os.path.join(root, 'dicoms', patient)
  _upload_copy(pacs, os.path.join(folder, '1.dcm'), tmp_path, InstanceNumber=None)
  _upload_copy(pacs, os.path.join(folder, '3.dcm'), tmp_path)  # a second number 3
  out = str(tmp_path / 'OUT')
  assert cli.main(_pacs_args(pacs.dicomweb, root, out)) == cli.EXIT_DROPPED
  tables = dataset_tables(out)
  assert sorted(r['slice_index'] for r in tables['slices']) == [1, 2, 4, 5]
  errors = tables['errors']
  assert [r['stage'] for r in errors] == [schema.STAGE_SEARCH] * 3
  assert sum('has no InstanceNumber' in r['error'] for r in errors) == 1
  assert (
    sum('InstanceNumber 3 is held by 2 instances' in r['error'] for r in errors) == 2
  )
  assert all(r['path'].startswith('studies/') for r in errors)


def test_search_pages_hold_fewer_instances_than_a_patient_has(
  pacs, credentials, tmp_path
):
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, 'PAGE', patients=1, slices=23, rows=8, columns=8)
  (patient,) = os.listdir(os.path.join(root, 'dicoms'))
  config = dicomweb.DicomWebConfig(pacs.dicomweb, page_size=5)
  found = list(dicomweb.DicomWebClient(config).search(patient))
  assert sorted(int(i.number) for i in found) == list(range(1, 24))
  out = str(tmp_path / 'OUT')
  args = _pacs_args(
    pacs.dicomweb, root, out, '--dicomweb-page-size', '4', '--chunk-size', '5'
  )
  assert cli.main(args) == cli.EXIT_OK
  written = sorted(r['slice_index'] for r in dataset_tables(out)['slices'])
  assert written == list(range(1, 24))
  # One retrieve brought the series; it is written in the row groups of the
  # tree's chunks of --chunk-size slices.
  assert _fetches(out) == (23, 0, 0)
  tree_out = str(tmp_path / 'TREE')
  assert cli.main(['--input', root, '--output', tree_out, '--chunk-size', '5']) == 0

  def sizes(folder):
    found = []
    for path in glob.glob(os.path.join(folder, 'slices', '*.parquet')):
      meta = pq.ParquetFile(path).metadata
      found += [meta.row_group(k).num_rows for k in range(meta.num_row_groups)]
    return sorted(found)

  assert sizes(out) == sizes(tree_out) and len(sizes(out)) >= 5


@pytest.mark.parametrize(
  'mode, concurrency, retrieves',
  [('instance', 3, 32), ('series', 1, 2), ('series', 3, 2)],
)
def test_retrieves_in_flight_never_exceed_the_read_concurrency(
  pacs, credentials, tmp_path, mode, concurrency, retrieves
):
  root = str(tmp_path / 'DATA')
  prefix = f'CONC{mode[0]}{concurrency}'
  _uploaded_tree(pacs, root, prefix, patients=2, slices=16, rows=8, columns=8)
  with proxy.started(pacs.root, '--http', '--delay', '0.05') as (endpoint, figures):
    args = _pacs_args(
      endpoint + '/dicom-web',
      root,
      str(tmp_path / 'OUT'),
      '--read-concurrency',
      str(concurrency),
      '--dicomweb-retrieve',
      mode,
    )
    assert cli.main(args) == cli.EXIT_OK
  # 1 pre-flight search, 2 patients' searches (a page, an empty one and the
  # series' instance counts each), then one retrieve per instance, or per
  # series (its answer read while the next series is asked for, within the
  # bound).
  assert figures['requests'] == 1 + 2 * 3 + retrieves
  assert min(2, concurrency) <= figures['max_in_flight'] <= concurrency
  assert _fetches(str(tmp_path / 'OUT'))[:2] == (
    (32, 0) if mode == 'series' else (0, 32)
  )


def test_wrong_credentials_are_one_line_and_exit_two_before_anything_runs(
  pacs, monkeypatch, tmp_path, capsys
):
  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=1, slices=2, rows=8, columns=8)
  monkeypatch.setenv(dicomweb.ENV_USERNAME, orthanc.USER)
  monkeypatch.setenv(dicomweb.ENV_PASSWORD, 'not-the-password')
  out = str(tmp_path / 'OUT')
  assert cli.main(_pacs_args(pacs.dicomweb, root, out)) == cli.EXIT_USAGE
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f'error: --dicomweb-url {pacs.dicomweb}: the server refused')
  assert 'HTTP 401' in line and 'not-the-password' not in line
  assert not os.path.exists(out)


def _all_bytes(*folders):
  for folder in folders:
    for dirpath, _, names in os.walk(folder):
      for name in names:
        with open(os.path.join(dirpath, name), 'rb') as f:
          yield os.path.join(dirpath, name), f.read()


def test_credentials_never_reach_logs_outputs_or_options(
  pacs, tmp_path, monkeypatch, log_dir
):
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, 'CRED', patients=1, slices=3, rows=8, columns=8)
  auth = tmp_path / 'pacs.json'
  auth.write_text(json.dumps({'username': orthanc.USER, 'password': orthanc.PASSWORD}))
  auth.chmod(0o600)
  out = str(tmp_path / 'OUT')
  env = dict(os.environ, CI='', **{dicomweb.ENV_USERNAME: ''})
  args = _pacs_args(pacs.dicomweb, root, out, '--dicomweb-auth-file', str(auth))
  done = _run_pipeline(args, env)
  assert done.returncode == cli.EXIT_OK, done.stderr.decode()[-2000:]
  basic = dicomweb.auth_headers(dicomweb.DicomWebConfig('http://x', str(auth)))
  secrets = [orthanc.PASSWORD.encode(), basic['Authorization'].split()[1].encode()]
  places = [
    ('stdout', done.stdout),
    ('stderr', done.stderr),
    *_all_bytes(out, log_dir),
  ]
  assert len(places) > 5
  for where, data in places:
    for secret in secrets:
      assert secret not in data, where

  auth.chmod(0o644)  # every user may read it now
  args = _pacs_args(
    pacs.dicomweb, root, str(tmp_path / 'OUT2'), '--dicomweb-auth-file', str(auth)
  )
  done = _run_pipeline(args, env)
  assert done.returncode == cli.EXIT_USAGE
  assert done.stderr.decode().strip() == (
    f'error: --dicomweb-auth-file {auth} may be read or written by its group or '
    'by every user (mode 644): chmod 600 it'
  )


@pytest.mark.parametrize('mode', [dicomweb.INSTANCE, dicomweb.SERIES])
def test_a_server_stopped_mid_run_leaves_fetch_rows_and_a_dataset(
  tmp_path, credentials, mode
):
  orthanc.require()
  root = str(tmp_path / 'DATA')
  with orthanc.started(str(tmp_path / 'orthanc')) as server:
    _uploaded_tree(server, root, 'STOP', patients=2, slices=12, rows=8, columns=8)
    # The proxy stops Orthanc (by its pid) once 11 requests have been
    # answered: the pre-flight search, three per patient (a page, an empty
    # one, the series' counts), then 4 retrieves; asking for series, once the
    # searches are answered: both series' retrieves fail, and so does every
    # instance then retrieved alone.
    answered = '11' if mode == dicomweb.INSTANCE else '7'
    stop = ['--stop-after', answered, '--upstream-pid', str(server.pid)]
    with proxy.started(server.root, '--http', *stop) as (endpoint, figures):
      out = str(tmp_path / 'OUT')
      args = _pacs_args(
        endpoint + '/dicom-web',
        root,
        out,
        '--read-concurrency',
        '1',
        '--request-attempts',
        '2',
        '--dicomweb-retrieve',
        mode,
      )
      assert cli.main(args) == cli.EXIT_DROPPED
  tables = dataset_tables(out)
  fetched = [r for r in tables['errors'] if r['stage'] == schema.STAGE_FETCH]
  assert len(fetched) + len(tables['slices']) == 24
  if mode == dicomweb.INSTANCE:
    assert 4 <= len(tables['slices']) <= 6
  else:
    assert tables['slices'] == [] and _fetches(out) == (0, 24, 2)
  assert all(
    r['error'].startswith('cannot retrieve: no answer from the server after 2')
    for r in fetched
  )


def test_throttled_retrieves_are_retried_and_failing_ones_are_fetch_rows(
  pacs, credentials, tmp_path
):
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, 'RETRY', patients=1, slices=6, rows=8, columns=8)
  (patient,) = os.listdir(os.path.join(root, 'dicoms'))
  kept = [i for i in _instances(pacs, patient) if i.number != '4']
  # 4 retrieves answered 503 once each, then served; the slice 4 never.
  (failing,) = {i.sop for i in _instances(pacs, patient)} - {i.sop for i in kept}
  rules = ['--fail', f'/{failing}=-1', '--fail', '/instances/1.=4']
  with proxy.started(pacs.root, *rules) as (endpoint, figures):
    out = str(tmp_path / 'OUT')
    args = _pacs_args(
      endpoint + '/dicom-web',
      root,
      out,
      '--request-attempts',
      '3',
      '--dicomweb-retrieve',
      'instance',
    )
    assert cli.main(args) == cli.EXIT_DROPPED
  tables = dataset_tables(out)
  assert sorted(r['slice_index'] for r in tables['slices']) == [1, 2, 3, 5, 6]
  (row,) = tables['errors']
  assert row['stage'] == schema.STAGE_FETCH and failing in row['path']
  assert 'HTTP 503 Service Unavailable after 3 attempts' in row['error']
  assert figures['faults'] == 3 + 4


@pytest.mark.parametrize('refusals', [1, -1])
def test_a_refused_series_retrieve_is_retried_then_taken_instance_by_instance(
  pacs, credentials, tmp_path, refusals
):
  root = str(tmp_path / 'DATA')
  _uploaded_tree(
    pacs, root, f'SER{refusals + 1}', patients=1, slices=6, rows=8, columns=8
  )
  (patient,) = os.listdir(os.path.join(root, 'dicoms'))
  found = _instances(pacs, patient)
  (series,) = {i.series for i in found}
  (failing,) = [i.sop for i in found if i.number == '4']
  # The series' retrieve (its request line ends with the series UID) is
  # answered 503 once (then served) or always; slice 4 alone always.
  rules = ['--fail', f'/series/{series} HTTP={refusals}', '--fail', f'/{failing}=-1']
  with proxy.started(pacs.root, *rules) as (endpoint, figures):
    out = str(tmp_path / 'OUT')
    args = _pacs_args(endpoint + '/dicom-web', root, out, '--request-attempts', '3')
    code = cli.main(args)
  tables = dataset_tables(out)
  if refusals == 1:  # retried: every instance comes with the series
    assert code == cli.EXIT_OK and figures['faults'] == 1
    assert len(tables['slices']) == 6 and _fetches(out) == (6, 0, 0)
    return
  assert code == cli.EXIT_DROPPED
  assert figures['faults'] == 3 + 3
  assert sorted(r['slice_index'] for r in tables['slices']) == [1, 2, 3, 5, 6]
  (row,) = tables['errors']
  assert row['stage'] == schema.STAGE_FETCH and failing in row['path']
  assert 'HTTP 503 Service Unavailable after 3 attempts' in row['error']
  assert _fetches(out) == (0, 6, 1)


def _instance(number='7', series='1.2.3', sop='1.2.3.4', **more):
  values = {
    'study': '1.2',
    'series': series,
    'sop': sop,
    'number': number,
    'series_number': '',
    'series_description': '',
    'modality': 'MR',
    'patient_id': 'P1',
  }
  return dicomweb.Instance(**{**values, **more})


def test_choose_series_rejects_what_cannot_name_a_slice_or_a_url():
  instances = [
    _instance('1', sop='1.1'),
    _instance(' +2 ', sop='1.2'),  # an IS may carry a sign and spaces
    _instance('', sop='1.3'),
    _instance('-1', sop='1.4'),
    _instance('3', sop='../../x'),  # a hostile server: not a UID
    _instance('3', sop='1.' + '1' * 70),
  ]
  chosen = pacs_stage.choose_series('P1', 'q', instances)
  assert [(f.slice_index, f.path) for f in chosen.files] == [
    (1, 'studies/1.2/series/1.2.3/instances/1.1'),
    (2, 'studies/1.2/series/1.2.3/instances/1.2'),
  ]
  assert chosen.reconciliation == []
  paths = [path for path, _ in chosen.errors]
  assert paths.count('q') == 2  # the bad UIDs never become a path
  assert any('has no InstanceNumber' in m for _, m in chosen.errors)
  assert any("InstanceNumber '-1'" in m for _, m in chosen.errors)


def test_a_series_filter_matches_ignoring_case_and_can_match_nothing():
  instances = [
    _instance('1', series='1.5', sop='1.5.1', series_description='SA CINE'),
    _instance('1', series='1.6', sop='1.6.1', series_description='Localizer'),
  ]
  ambiguous = pacs_stage.choose_series('P1', 'q', instances)
  ((status, detail),) = ambiguous.reconciliation
  assert status == schema.AMBIGUOUS_SERIES and '1.5 (' in detail and '1.6 (' in detail
  assert ambiguous.files == []
  cine = dicomweb.parse_series_filter('SeriesDescription=*cine*')
  (chosen,) = pacs_stage.choose_series('P1', 'q', instances, cine).files
  assert chosen.path.endswith('/instances/1.5.1')
  none = dicomweb.parse_series_filter('Modality=CT')
  ((status, detail),) = pacs_stage.choose_series(
    'P1', 'q', instances, none
  ).reconciliation
  assert status == schema.MISSING_DICOMS and 'Modality=CT' in detail


@pytest.mark.parametrize(
  'args, message',
  [
    (['--series-filter', 'Modality=MR'], '--series-filter needs --dicomweb-url'),
    (
      ['--dicomweb-retrieve', 'instance'],
      '--dicomweb-retrieve needs --dicomweb-url',
    ),
    (
      ['--dicomweb-url', 'http://127.0.0.1:1/x', '--dicomweb-retrieve', 'study'],
      "--dicomweb-retrieve: invalid choice: 'study'",
    ),
    (
      ['--dicomweb-url', 'http://u:p@127.0.0.1:1/dicom-web'],
      '--dicomweb-url must not hold a user name or password',
    ),
    (['--dicomweb-url', 'ftp://127.0.0.1/x'], 'must be an http:// or https:// URL'),
    (
      ['--dicomweb-url', 'http://127.0.0.1:1/x', '--series-filter', 'PatientName=x'],
      'must be KEYWORD=PATTERN',
    ),
    (
      ['--dicomweb-url', 'http://127.0.0.1:1/x', '--dicomweb-page-size', '0'],
      '--dicomweb-page-size must be at least 1',
    ),
  ],
)
def test_pacs_option_mistakes_are_one_line_and_exit_two(
  args, message, tmp_path, capsys
):
  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=1, slices=1, rows=8, columns=8)
  out = str(tmp_path / 'OUT')
  assert cli.main(['--input', root, '--output', out, *args]) == cli.EXIT_USAGE
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith('error: ') and message in line
  assert 'u:p' not in line or 'must not hold' in line
  assert not os.path.exists(out)


def test_an_unreachable_server_is_one_line_and_exit_two(tmp_path, capsys, credentials):
  from tests.helpers import free_port

  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=1, slices=1, rows=8, columns=8)
  url = f'http://127.0.0.1:{free_port()}/dicom-web'
  args = ['--input', root, '--output', str(tmp_path / 'OUT'), '--dicomweb-url', url]
  assert cli.main([*args, '--request-attempts', '1']) == cli.EXIT_USAGE
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith(f'error: --dicomweb-url {url}: no answer from the server')


def test_credentials_come_from_the_environment_or_a_private_file(tmp_path, monkeypatch):
  config = dicomweb.DicomWebConfig('http://127.0.0.1:1')
  for name in (dicomweb.ENV_USERNAME, dicomweb.ENV_PASSWORD, dicomweb.ENV_TOKEN):
    monkeypatch.delenv(name, raising=False)
  assert dicomweb.auth_headers(config) == {}
  monkeypatch.setenv(dicomweb.ENV_TOKEN, 'tok-123')
  assert dicomweb.auth_headers(config) == {'Authorization': 'Bearer tok-123'}
  auth = tmp_path / 'auth.json'
  auth.write_text('{"password": "hunter2-secret", oops')
  auth.chmod(0o600)
  with_file = dicomweb.DicomWebConfig('http://127.0.0.1:1', str(auth))
  with pytest.raises(ValueError) as raised:
    dicomweb.auth_headers(with_file)
  assert 'not valid JSON' in str(raised.value)
  assert 'hunter2' not in str(raised.value)  # a secret is never quoted


def test_a_retrieve_answer_holds_exactly_one_dicom_part():
  def multipart(*parts, sized=True):
    body = b''.join(
      b'--b0\r\nContent-Type: application/dicom\r\n'
      + (b'Content-Length: %d\r\n' % len(p) if sized else b'')
      + b'\r\n'
      + p
      + b'\r\n'
      for p in parts
    )
    return body + b'--b0--\r\n'

  kind = 'multipart/related; type="application/dicom"; boundary=b0'
  data = b'\0' * 128 + b'DICM' + b'\r\n--b0 inside, passed over by its length'
  assert dicomweb._single_part(multipart(data), kind) == data
  plain = b'\0' * 128 + b'DICM\r\n-'
  assert dicomweb._single_part(multipart(plain, sized=False), kind) == plain
  assert dicomweb._single_part(data, 'application/dicom') == data
  with pytest.raises(OSError, match='more than one instance'):
    dicomweb._single_part(multipart(b'a', b'b'), kind)
  with pytest.raises(OSError, match='truncated'):
    dicomweb._single_part(multipart(b'abc')[:-12], kind)
  with pytest.raises(OSError, match='truncated'):
    dicomweb._single_part(multipart(b'abc', sized=False)[:-12], kind)
  with pytest.raises(OSError, match='not multipart/related'):
    dicomweb._single_part(b'{}', 'application/json')


def test_tls_is_verified_against_the_system_or_the_given_ca_bundle(
  pacs, credentials, tmp_path, capsys
):
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, 'TLS', patients=1, slices=3, rows=8, columns=8)
  pem, ca = proxy.self_signed(str(tmp_path))
  with proxy.started(pacs.root, '--http', '--tls', pem) as (endpoint, _):
    assert endpoint.startswith('https://')
    url = endpoint + '/dicom-web'
    args = _pacs_args(url, root, str(tmp_path / 'OUT'))
    # A self-signed certificate the system does not trust: refused up front.
    assert cli.main(args) == cli.EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f'error: --dicomweb-url {url}: ')
    assert 'CERTIFICATE_VERIFY_FAILED' in line or 'certificate verify failed' in line
    assert not os.path.exists(tmp_path / 'OUT')
    assert cli.main([*args, '--dicomweb-ca-bundle', ca]) == cli.EXIT_OK
  assert len(dataset_tables(str(tmp_path / 'OUT'))['slices']) == 3


def test_compressed_instances_arrive_as_stored_and_decode_as_in_a_tree(
  pacs, credentials, tmp_path
):
  from pydicom.data import get_testdata_file

  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=1, slices=2, rows=64, columns=64)
  _rename_patients(root, 'ZIP')
  (patient,) = os.listdir(os.path.join(root, 'dicoms'))
  for k, name in ((1, 'MR_small_jp2klossless.dcm'), (2, 'MR_small_RLE.dcm')):
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientID, ds.InstanceNumber = patient, k
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
      pydicom.uid.generate_uid(entropy_srcs=[patient, name])
    )
    ds.save_as(os.path.join(root, 'dicoms', patient, f'{k}.dcm'))
  stored, refused = orthanc.upload_tree(pacs, root)
  assert refused == [] and len(stored) == 2
  client = dicomweb.DicomWebClient(dicomweb.DicomWebConfig(pacs.dicomweb))
  for found in client.search(patient):  # never transcoded: the very bytes
    with open(os.path.join(root, 'dicoms', patient, f'{found.number}.dcm'), 'rb') as f:
      assert client.retrieve(found.path) == f.read()
  tree_out, pacs_out = str(tmp_path / 'tree'), str(tmp_path / 'pacs')
  # Both files hold the same pixels (duplicate_slice), and no contour file:
  # problem rows that drop nothing.
  assert cli.main(['--input', root, '--output', tree_out]) == cli.EXIT_OK
  assert cli.main(_pacs_args(pacs.dicomweb, root, pacs_out)) == cli.EXIT_OK
  tree = _without_paths(dataset_tables(tree_out))
  assert [r['transfer_syntax_uid'] for r in tree] == [
    pydicom.uid.JPEG2000Lossless,
    pydicom.uid.RLELossless,
  ]
  assert _without_paths(dataset_tables(pacs_out)) == tree


def test_a_failing_search_is_a_search_row_and_the_other_patients_are_written(
  pacs, credentials, tmp_path
):
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, 'SRCH', patients=2, slices=3, rows=8, columns=8)
  first, second = sorted(os.listdir(os.path.join(root, 'dicoms')))
  rules = ['--fail', f'PatientID={first}&=-1']
  with proxy.started(pacs.root, *rules) as (endpoint, figures):
    out = str(tmp_path / 'OUT')
    args = _pacs_args(endpoint + '/dicom-web', root, out, '--request-attempts', '2')
    assert cli.main(args) == cli.EXIT_DROPPED
  assert figures['faults'] == 2
  tables = dataset_tables(out)
  assert {r['patient_id'] for r in tables['slices']} == {second}
  (error,) = tables['errors']
  assert error['stage'] == schema.STAGE_SEARCH and error['patient_id'] == first
  assert error['path'] == f'instances?PatientID={first}'
  assert 'HTTP 503 Service Unavailable after 2 attempts' in error['error']
  # The search row explains the missing slices: no missing_dicoms row too.
  statuses = {(r['patient_id'], r['status']) for r in tables['reconciliation']}
  assert (first, schema.MISSING_DICOMS) not in statuses
  assert (second, schema.MATCHED) in statuses


def test_a_pseudonymised_pacs_run_shows_no_stored_id_or_uid(
  pacs, credentials, tmp_path, capsys
):
  root = str(tmp_path / 'DATA')
  manifest, _ = _uploaded_tree(
    pacs, root, 'PZ', patients=2, slices=5, rows=16, columns=12, quirks=['phi']
  )
  key = tmp_path / 'key'
  assert cli.command(['keygen', str(key)]) == cli.EXIT_OK
  keyed = ['--pseudonymize-key-file', str(key)]
  tree_out, pacs_out = str(tmp_path / 'tree'), str(tmp_path / 'pacs')
  id_map = str(tmp_path / 'map.csv')
  assert cli.main(['--input', root, '--output', tree_out, *keyed]) == cli.EXIT_OK
  capsys.readouterr()
  args = _pacs_args(pacs.dicomweb, root, pacs_out, *keyed, '--id-map', id_map)
  assert cli.main(args) == cli.EXIT_OK
  shown = capsys.readouterr()
  forbidden = identifiers(root, manifest)
  places = [
    *texts_under(pacs_out),
    ('stdout', shown.out),
    ('stderr', shown.err),
    ('parquet values', parquet_text(pacs_out)),
  ]
  assert not leaks(forbidden, places)
  tree, pacs_tables = dataset_tables(tree_out), dataset_tables(pacs_out)
  assert len(pacs_tables['slices']) == 10
  assert _without_paths(pacs_tables) == _without_paths(tree)
  uids = {e.original: e.pseudonym for e in keys.read_id_map(id_map) if e.kind == 'uid'}
  for row in pacs_tables['slices']:
    study, series, sop = (
      row[c] for c in ('study_instance_uid', 'series_instance_uid', 'sop_instance_uid')
    )
    assert row['dicom_path'] == f'studies/{study}/series/{series}/instances/{sop}'
    assert sop.startswith('2.25.') and sop in uids.values()


def test_an_incremental_pacs_run_decodes_only_patients_with_new_instances(
  pacs, credentials, tmp_path
):
  """On a PACS a slice is an instance, which never changes under its SOP
  Instance UID: a patient is decoded again when its series' instances
  change, and the version equals a full run's."""
  root = str(tmp_path / 'DATA')
  _uploaded_tree(pacs, root, 'INC', patients=3, slices=4, rows=8, columns=8)
  out = str(tmp_path / 'OUT')
  time.sleep(layout.RACY_NS / 1e9 + 0.1)  # the tree's contour files settle
  assert cli.main(_pacs_args(pacs.dicomweb, root, out)) == cli.EXIT_OK
  assert cli.main(_pacs_args(pacs.dicomweb, root, out)) == cli.EXIT_OK
  assert read_summary(out)['patients']['kept'] == 3
  assert _fetches(out)[:2] == (0, 0)  # nothing retrieved
  patient = sorted(os.listdir(os.path.join(root, 'dicoms')))[1]
  path = os.path.join(root, 'dicoms', patient, '4.dcm')
  _upload_copy(pacs, path, tmp_path, InstanceNumber=5)  # a copy: flagged
  assert cli.main(_pacs_args(pacs.dicomweb, root, out)) == cli.EXIT_OK
  found = read_summary(out)['patients']
  assert (found['replaced'], found['kept']) == (1, 2)
  assert sum(_fetches(out)[:2]) == 5  # the changed patient's instances only
  full = str(tmp_path / 'FULL')
  assert cli.main(_pacs_args(pacs.dicomweb, root, full)) == cli.EXIT_OK
  assert dataset_tables(out) == dataset_tables(full)
  assert verify.verify(out).failures == []
