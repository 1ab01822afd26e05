"""QIDO-RS paging against a real Orthanc: no instance lost, whatever the page
size and wherever copies of an instance sit.

Each patient of one generated tree holds its slices in one series (the
"cine") and copies of some of them (their SOP Instance UIDs kept) in a
series or a study of their own, uploaded at a place of its own among the
slices, so that wherever Orthanc puts them in its answers (an order of its
own), the page sizes together put them on every side of the page
boundaries. A search must list each instance once, whatever the page size
from 1 to past the patient's count, and a PACS run (``--series-filter``
choosing the cine) must write the dataset the tree run writes. A server
that ignores ``offset`` is Orthanc behind tests/proxy.py dropping it from
every request (and capping every answer, for the case where nothing can
list every instance). A server that honours ``offset`` but lists only so
many instances in all, or so many an answer, with or without PS3.18's
``Warning`` header, is Orthanc behind a small front of this module's
(``_capping``), which cuts its search answers.
Without Orthanc these tests skip; under CI (CI=true) they fail.
"""

import contextlib
import http.server
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request

import pydicom
import pytest

from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from tests import orthanc, proxy
from tests.helpers import dataset_tables
from transforms.contract import schema
from transforms.io import dicomweb

CINE = 'SAX CINE'
FILTER = ['--series-filter', f'SeriesDescription={CINE}']
SLICES = 5
# Per patient: (the slices copied, where their copies are uploaded among the
# patient's slices, whether the copies are in a study of their own).
PLACEMENTS = [
  ([1], 0, False),  # the first slice's copy, uploaded before every slice
  ([3], 3, False),  # in the middle
  ([5], SLICES, False),  # the last slice's, after every slice
  ([1, 2, 3, 4, 5], 'interleaved', False),  # each copy right after its slice
  ([2, 4], 1, True),  # two copies, in another study
]


@pytest.fixture(autouse=True)
def _credentials(credentials):
  """Every test here talks to the server."""


def _uid(*parts):
  return pydicom.uid.generate_uid(entropy_srcs=[str(p) for p in parts])


def _prepare(root, prefix):
  """Prefixes every patient id and derives new UIDs (the tests share one
  server), and names each series CINE; {patient: [slice paths by number]}."""
  links = os.path.join(root, 'link.csv')
  with open(links, encoding='utf-8-sig') as f:
    text = f.read()
  slices = {}
  for folder in sorted(os.listdir(os.path.join(root, 'dicoms'))):
    patient = prefix + folder
    text = text.replace(folder, patient)
    old = os.path.join(root, 'dicoms', folder)
    paths = sorted(
      (os.path.join(old, n) for n in os.listdir(old)),
      key=lambda p: int(os.path.basename(p).split('.')[0]),
    )
    for path in paths:
      ds = pydicom.dcmread(path)
      ds.PatientID = patient
      ds.SeriesDescription = CINE
      for keyword in ('StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID'):
        setattr(ds, keyword, _uid(prefix, getattr(ds, keyword)))
      ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
      ds.save_as(path)
    os.rename(old, os.path.join(root, 'dicoms', patient))
    slices[patient] = [
      p.replace(old, os.path.join(root, 'dicoms', patient)) for p in paths
    ]
  with open(links, 'w', encoding='utf-8') as f:
    f.write(text)
  return slices


def _copy(path, folder, other_study):
  """A copy of the slice at ``path`` in a series (and, if so, a study) of
  its own, its SOP Instance UID kept; (its path, its key)."""
  ds = pydicom.dcmread(path)
  ds.SeriesInstanceUID = _uid('copies', ds.SeriesInstanceUID)
  ds.SeriesDescription = 'LOCALIZER COPY'
  if other_study:
    ds.StudyInstanceUID = _uid('copies', ds.StudyInstanceUID)
  target = os.path.join(folder, f'{ds.SOPInstanceUID}.{ds.SeriesInstanceUID}.dcm')
  ds.save_as(target)
  return target, (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def _key(path):
  ds = pydicom.dcmread(path, stop_before_pixels=True)
  return (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


@pytest.fixture(scope='module')
def placed(pacs, tmp_path_factory):
  """The tree (one patient per placement) with its slices and their copies
  uploaded in the placements' orders; (root, tree output, {patient: every
  key it holds on the server}) with the tree run made."""
  base = tmp_path_factory.mktemp('placed')
  root = str(base / 'DATA')
  sample.make_tree(root, patients=len(PLACEMENTS), slices=SLICES, rows=12, columns=10)
  slices = _prepare(root, 'PG')
  copies = base / 'copies'
  copies.mkdir()
  expected = {}
  for (patient, paths), (copied, where, other_study) in zip(
    sorted(slices.items()), PLACEMENTS, strict=True
  ):
    made = {k: _copy(paths[k - 1], str(copies), other_study) for k in copied}
    if where == 'interleaved':
      order = [p for k, path in enumerate(paths, 1) for p in (path, made[k][0])]
    else:
      order = paths[:where] + [m[0] for m in made.values()] + paths[where:]
    for path in order:
      assert orthanc.upload(pacs, path), path
    expected[patient] = {_key(p) for p in paths} | {m[1] for m in made.values()}
  tree_out = str(base / 'TREE')
  assert cli.main(['--input', root, '--output', tree_out]) == cli.EXIT_OK
  return root, tree_out, expected


def _without_paths(tables):
  slices = [dict(r, dicom_path=None) for r in tables['slices']]
  return sorted(slices, key=lambda r: (r['patient_id'], r['slice_index']))


def test_every_page_size_lists_every_instance_once(pacs, placed):
  _, _, expected = placed
  most = max(len(keys) for keys in expected.values())
  for page_size in range(1, most + 2):
    config = dicomweb.DicomWebConfig(pacs.dicomweb, page_size=page_size)
    client = dicomweb.DicomWebClient(config)
    for patient, keys in expected.items():
      found = [i.key for i in client.search(patient)]
      assert len(found) == len(set(found)), (page_size, patient)
      assert set(found) == keys, (page_size, patient)


def test_a_pacs_run_writes_the_tree_dataset_at_every_page_size(pacs, placed, tmp_path):
  root, tree_out, expected = placed
  tree = dataset_tables(tree_out)
  assert len(tree['slices']) == SLICES * len(PLACEMENTS)
  most = max(len(keys) for keys in expected.values())
  for page_size in range(1, most + 2):
    out = str(tmp_path / f'OUT{page_size}')
    args = [
      '--input',
      root,
      '--dicomweb-url',
      pacs.dicomweb,
      '--output',
      out,
      '--dicomweb-page-size',
      str(page_size),
      *FILTER,
    ]
    assert cli.main(args) == cli.EXIT_OK, page_size
    tables = dataset_tables(out)
    assert _without_paths(tables) == _without_paths(tree), page_size
    assert tables['errors'] == [] == tree['errors'], page_size
    assert [(r['patient_id'], r['status']) for r in tables['reconciliation']] == [
      (r['patient_id'], r['status']) for r in tree['reconciliation']
    ], page_size


def _ignoring(pacs, root, out, *faults, page_size=3):
  """A PACS run of ``root`` through a proxy dropping ``offset`` (and
  applying ``faults``); (exit code, the proxy's figures)."""
  with proxy.started(pacs.root, '--drop-param', 'offset', *faults) as (
    endpoint,
    figures,
  ):
    args = [
      '--input',
      root,
      '--dicomweb-url',
      endpoint + '/dicom-web',
      '--output',
      out,
      '--dicomweb-page-size',
      str(page_size),
    ]
    code = cli.main(args)
  return code, figures


def _uploaded(pacs, root, prefix, patients, slices, kept=None):
  """A tree whose slices are uploaded; ``kept``: {patient index: slices
  left}, the others removed from the tree first. {patient: slice paths}."""
  sample.make_tree(root, patients=patients, slices=slices, rows=8, columns=8)
  by_patient = _prepare(root, prefix)
  for k, paths in enumerate(by_patient.values()):
    for path in paths[(kept or {}).get(k, slices) :]:
      os.remove(path)
    for path in paths[: (kept or {}).get(k, slices)]:
      assert orthanc.upload(pacs, path)
  return by_patient


def test_a_server_that_ignores_offset_is_searched_without_a_limit(
  pacs, tmp_path, capsys
):
  root = str(tmp_path / 'DATA')
  _uploaded(pacs, root, 'IGN', patients=2, slices=7)
  tree_out = str(tmp_path / 'TREE')
  assert cli.main(['--input', root, '--output', tree_out]) == cli.EXIT_OK
  capsys.readouterr()
  out = str(tmp_path / 'OUT')
  code, _ = _ignoring(pacs, root, out)
  assert code == cli.EXIT_OK
  assert _without_paths(dataset_tables(out)) == _without_paths(dataset_tables(tree_out))
  assert len(dataset_tables(out)['slices']) == 14
  warned = [line for line in capsys.readouterr().err.splitlines() if 'offset' in line]
  assert len(warned) == 1 and 'searching without a limit instead' in warned[0]


def test_a_server_that_ignores_offset_and_caps_its_answers_is_a_search_row(
  pacs, tmp_path
):
  """Every answer capped at 4 instances, without saying so: the patient of 7
  instances cannot be listed whole (its series says it holds 7) and is one
  search row; the patient of 4 is written whole."""
  root = str(tmp_path / 'DATA')
  whole, capped = sorted(_uploaded(pacs, root, 'CAP', 2, 7, kept={0: 4}))
  tree_out = str(tmp_path / 'TREE')
  cli.main(['--input', root, '--output', tree_out])
  out = str(tmp_path / 'OUT')
  code, _ = _ignoring(pacs, root, out, '--set-param', 'limit=4')
  assert code == cli.EXIT_DROPPED
  tables, tree = dataset_tables(out), dataset_tables(tree_out)
  assert len(tables['slices']) == 4
  # (the split too may differ: one patient is written, not two)
  assert [dict(r, split=None) for r in _without_paths(tables)] == [
    dict(r, split=None) for r in _without_paths(tree) if r['patient_id'] == whole
  ]
  (row,) = [r for r in tables['errors'] if r['stage'] == schema.STAGE_SEARCH]
  assert row['patient_id'] == capped
  assert row['error'].startswith('incomplete search: the server repeats its search')
  assert 'its series hold 7 instances and it lists 4 of them' in row['error']
  assert 'none of them is used' in row['error']
  assert [r for r in tables['errors'] if r is not row] == [
    r for r in tree['errors'] if r['patient_id'] == whole
  ]

  def statuses(rows, patient):
    return sorted(r['status'] for r in rows if r['patient_id'] == patient)

  # The row explains the patient's missing slices: no missing_dicoms row.
  assert statuses(tables['reconciliation'], capped) == []
  assert statuses(tables['reconciliation'], whole) == statuses(
    tree['reconciliation'], whole
  )


# PS3.18's Warning on an answer that holds fewer results than match.
WARNING = (
  '299 127.0.0.1: The number of results exceeded the maximum supported by '
  'the server. Additional results can be requested.'
)


@contextlib.contextmanager
def _capping(pacs, total=None, each=None, warn=True):
  """A server in front of ``pacs`` that honours ``limit`` and ``offset`` but
  lists at most ``total`` instances in all (none past it), or ``each`` an
  answer; ``warn``: with a Warning header on every answer it cut. Yields
  (its DICOMweb URL, the answers it cut)."""
  cut = []

  class Front(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      names = ('Authorization', 'Accept')
      sent = {k: self.headers[k] for k in names if self.headers[k]}
      request = urllib.request.Request(pacs.root + self.path, headers=sent)
      try:
        with urllib.request.urlopen(request, timeout=60) as answer:
          status, headers, body = answer.status, answer.headers, answer.read()
      except urllib.error.HTTPError as e:
        status, headers, body = e.code, e.headers, e.read()
      url = urllib.parse.urlsplit(self.path)
      warning = None
      if status == 200 and url.path.endswith('/instances') and url.query:
        items = json.loads(body)
        kept = len(items) if each is None else min(len(items), each)
        if total is not None:
          offset = int(dict(urllib.parse.parse_qsl(url.query)).get('offset', 0))
          kept = min(kept, max(0, total - offset))
        if kept < len(items):
          cut.append(self.path)
          body = json.dumps(items[:kept]).encode()
          warning = WARNING if warn else None
      self.send_response(status)
      self.send_header('Content-Type', headers.get('Content-Type', 'text/plain'))
      self.send_header('Content-Length', str(len(body)))
      if warning:
        self.send_header('Warning', warning)
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Front)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}/dicom-web', cut
  finally:
    server.shutdown()
    server.server_close()


def _through(url, root, out, page_size=3):
  args = ['--input', root, '--dicomweb-url', url, '--output', out]
  return cli.main([*args, '--dicomweb-page-size', str(page_size)])


# A front that lists 4 instances in all, offset honoured: (its settings,
# what the search row says of it).
TOTALS = {
  'with a Warning': ({}, 'it says it left results out'),
  'silently': ({'warn': False}, 'its series hold 7 instances and it lists 4 of them'),
}


@pytest.mark.parametrize('total', TOTALS)
def test_a_server_that_honours_offset_but_caps_its_total_is_a_search_row(
  pacs, tmp_path, total
):
  """Pages of 3 from a server that lists 4 instances in all: the patient of
  7 gets 3, 1, then an empty page, as if it held 4; the Warning on the last
  pages (or, without one, its series' count of 7) makes it one search row.
  The patient of 4 is written whole (was: 4 of the 7 slices written, exit 0,
  no row)."""
  settings, why = TOTALS[total]
  root = str(tmp_path / 'DATA')
  prefix = f'TOT{list(TOTALS).index(total)}'
  whole, capped = sorted(_uploaded(pacs, root, prefix, 2, 7, kept={0: 4}))
  tree_out = str(tmp_path / 'TREE')
  cli.main(['--input', root, '--output', tree_out])
  out = str(tmp_path / 'OUT')
  with _capping(pacs, total=4, **settings) as (url, cut):
    code = _through(url, root, out)
  assert cut  # the front did cut answers
  assert code == cli.EXIT_DROPPED
  tables, tree = dataset_tables(out), dataset_tables(tree_out)
  assert [dict(r, split=None) for r in _without_paths(tables)] == [
    dict(r, split=None) for r in _without_paths(tree) if r['patient_id'] == whole
  ]
  (row,) = [r for r in tables['errors'] if r['stage'] == schema.STAGE_SEARCH]
  assert row['patient_id'] == capped
  assert row['error'].startswith(
    'incomplete search: the server ends its search pages at 4 instances ('
  )
  assert why in row['error'] and 'none of them is used' in row['error']
  assert [r for r in tables['errors'] if r is not row] == [
    r for r in tree['errors'] if r['patient_id'] == whole
  ]
  assert not [r for r in tables['reconciliation'] if r['patient_id'] == capped]


def test_a_server_that_cuts_each_answer_and_says_so_is_paged_through(pacs, tmp_path):
  """2 instances an answer, each cut answer with its Warning: paging goes
  on past them, every slice is written as the tree run writes it, no row."""
  root = str(tmp_path / 'DATA')
  _uploaded(pacs, root, 'EACH', patients=2, slices=7)
  tree_out = str(tmp_path / 'TREE')
  assert cli.main(['--input', root, '--output', tree_out]) == cli.EXIT_OK
  out = str(tmp_path / 'OUT')
  with _capping(pacs, each=2) as (url, cut):
    code = _through(url, root, out)
  assert cut and code == cli.EXIT_OK
  tables = dataset_tables(out)
  assert _without_paths(tables) == _without_paths(dataset_tables(tree_out))
  assert tables['errors'] == []
