"""Keyed pseudonyms (--pseudonymize-key-file), the id map (--id-map), and the
leak test: after a pseudonymised run of a tree whose headers are full of
identifiers (the generator's 'phi' quirk), no marker, original id or
original UID appears in any byte under OUT, any Parquet value, the QA
pages, stdout, stderr or the log file.
"""

import base64
import glob
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from beam_pipeline.launch import cli
from beam_pipeline.tools import keys, sample
from tests.helpers import dataset_tables, identifiers, leaks, parquet_text, texts_under
from transforms.contract import layout, splits
from transforms.contract.pseudonyms import (
  IDENTITY,
  KEY_BYTES,
  ORIGINAL_ID,
  PATIENT_ID,
  UID,
  Pseudonyms,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 140))
_UID_RE = re.compile(r'(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*')


def test_pseudonyms_are_keyed_consistent_and_valid():
  mine, other = Pseudonyms(KEY), Pseudonyms(OTHER_KEY)
  assert mine.patient('SCD0000101') == Pseudonyms(KEY).patient('SCD0000101')
  assert mine.patient('SCD0000101') != other.patient('SCD0000101')
  assert mine.patient('SCD0000101') != mine.patient('SCD0000102')
  # Domain separation: the same text as a patient_id, an original_id, a name.
  assert (
    len({mine.patient('X1')[1:], mine.original('X1')[1:], mine.name('X1')[1:]}) == 3
  )
  for shown in (mine.patient('SCD 01/..'), mine.original('ü'), mine.name('a b')):
    assert layout.id_problem(shown) is None, shown
  uid = mine.uid('1.2.826.0.1.3680043.10.1011.5.1')
  assert uid.startswith('2.25.') and len(uid) <= 64 and _UID_RE.fullmatch(uid)
  assert (
    uid
    == mine.uid('1.2.826.0.1.3680043.10.1011.5.1')
    != other.uid('1.2.826.0.1.3680043.10.1011.5.1')
  )
  assert mine.uid('') == '' and mine.uid(None) is None
  assert IDENTITY.patient('SCD1') == 'SCD1' and IDENTITY.uid('1.2') == '1.2'
  assert KEY.hex() not in repr(mine) and 'keyed' in repr(mine)
  with pytest.raises(ValueError):
    Pseudonyms(b'short')


def test_paths_keep_only_the_layouts_own_names():
  p = Pseudonyms(KEY)
  assert p.path('dicoms/SCD01/48.dcm') == f'dicoms/{p.patient("SCD01")}/48.dcm'
  contour = 'contourfiles/SC-1/i-contours/IM-0001-0048-icontour-manual.txt'
  assert p.path(contour) == contour.replace('SC-1', p.original('SC-1'))
  stray = p.path('dicoms/SCD01/SCD01_notes.txt')
  assert 'SCD01' not in stray and stray.endswith(p.name('SCD01_notes.txt'))
  pacs = p.path('studies/1.2.3/series/1.2.4/instances/1.2.5')
  assert pacs == (
    f'studies/{p.uid("1.2.3")}/series/{p.uid("1.2.4")}/instances/{p.uid("1.2.5")}'
  )
  kinds = {e.kind for e in p.entries('dicoms/SCD01/x.txt')}
  assert kinds == {PATIENT_ID, 'name'}


def test_splits_follow_the_id_as_written():
  fractions = (0.5, 0.25, 0.25)
  ids = [f'SCD{n:07d}' for n in range(200)]
  data = ('patient_id,original_id\n' + ''.join(f'{i},O{i}\n' for i in ids)).encode()
  links, _ = layout.parse_links(data, Pseudonyms(KEY))
  assert [link.patient_id for link in links] != ids
  assert [link.query_id for link in links] == ids
  moved = [
    link
    for link in links
    if splits.split_at(link.position, fractions)
    != splits.assign_split(link.query_id, fractions)
  ]
  assert not moved


def test_keygen_writes_a_private_key_and_never_replaces_one(tmp_path, capsys):
  path = str(tmp_path / 'key')
  assert cli.command(['keygen', path]) == 0
  assert os.path.getsize(path) == KEY_BYTES
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  first = open(path, 'rb').read()
  assert cli.command(['keygen', path]) == 2
  assert 'never overwritten' in capsys.readouterr().err
  assert open(path, 'rb').read() == first
  assert keys.load(path).active


def _key_file(folder, data=KEY, mode=0o600, name='key'):
  path = os.path.join(str(folder), name)
  with open(path, 'wb') as f:
    f.write(data)
  os.chmod(path, mode)
  return path


@pytest.mark.parametrize(
  'case, message',
  [
    ('world_readable', 'may be read or written by its group or by every user'),
    ('short', f'a key has at least {KEY_BYTES}'),
    ('missing', 'No such file'),
    ('id_map_inside_output', 'is inside --output'),
    ('id_map_without_key', '--id-map needs --pseudonymize-key-file'),
  ],
)
def test_key_and_id_map_mistakes_stop_before_anything_runs(
  case, message, clean_tree, tmp_path, capsys
):
  root, _ = clean_tree
  out = str(tmp_path / 'OUT')
  if case == 'world_readable':
    key = _key_file(tmp_path, mode=0o644)
  elif case == 'short':
    key = _key_file(tmp_path, KEY[:31])
  else:
    key = _key_file(tmp_path) if case != 'missing' else str(tmp_path / 'nope')
  args = ['--pseudonymize-key-file', key]
  if case == 'id_map_inside_output':
    args += ['--id-map', os.path.join(out, 'map.csv')]
  elif case == 'id_map_without_key':
    args = ['--id-map', str(tmp_path / 'map.csv')]
  assert cli.main(['--input', root, '--output', out, *args]) == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  assert not os.path.exists(out)


def _run(args, log_dir):
  """run_pipeline.py in a process of its own: (exit code, stdout, stderr)."""
  env = dict(os.environ, CARDIAC_MRI_LOG_DIR=log_dir)
  done = subprocess.run(
    [sys.executable, 'run_pipeline.py', *args],
    cwd=REPO,
    capture_output=True,
    env=env,
    timeout=300,
  )
  return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope='module')
def phi_runs(tmp_path_factory):
  """A tree with every quirk and PHI in every header, run with the key
  (twice), with another key, and without one."""
  base = tmp_path_factory.mktemp('phi')
  root = str(base / 'DATA')
  manifest = sample.make_tree(
    root, patients=4, slices=10, rows=24, columns=20, quirks=['all']
  )
  # A slice that is a symlink out of the tree, to a folder named by an id:
  # the read error quotes where it leads.
  pid = manifest.links[0][0]
  outside = base / 'outside' / pid
  outside.mkdir(parents=True)
  shutil.copy(os.path.join(root, 'dicoms', pid, '3.dcm'), outside / '3.dcm')
  os.symlink(outside / '3.dcm', os.path.join(root, 'dicoms', pid, '99.dcm'))
  key, other = _key_file(base, KEY), _key_file(base, OTHER_KEY, name='other')
  runs = {}
  for name, more in (
    ('keyed', ['--pseudonymize-key-file', key, '--id-map', str(base / 'keyed.csv')]),
    ('again', ['--pseudonymize-key-file', key]),
    ('other', ['--pseudonymize-key-file', other, '--id-map', str(base / 'other.csv')]),
    ('plain', []),
  ):
    out, qa, logs = (str(base / f'{name}-{part}') for part in ('out', 'qa', 'logs'))
    code, stdout, stderr = _run(
      ['--input', root, '--output', out, '--qa-dir', qa, *more], logs
    )
    assert code == cli.EXIT_DROPPED, stderr.decode()[-2000:]
    runs[name] = {
      'out': out,
      'qa': qa,
      'logs': logs,
      'stdout': stdout,
      'stderr': stderr,
    }
  return root, manifest, base, runs


def _places(run):
  yield from texts_under(run['out'])
  yield from texts_under(run['qa'])
  yield from texts_under(run['logs'])
  yield 'stdout', run['stdout']
  yield 'stderr', run['stderr']
  yield 'parquet values', parquet_text(run['out'])


def test_no_identifier_leaves_a_pseudonymised_run(phi_runs):
  root, manifest, _, runs = phi_runs
  forbidden = identifiers(root, manifest)
  assert 'SCD0000101' in forbidden and '19230817' in forbidden
  for name in ('keyed', 'other'):
    places = list(_places(runs[name]))
    assert len(places) > 10
    assert not leaks(forbidden, places)
    # Nor the key, in any form.
    key = KEY if name == 'keyed' else OTHER_KEY
    forms = [key.hex(), base64.b64encode(key).decode(), base64.b32encode(key).decode()]
    assert not leaks(forms, places)
    assert not [w for w, data in places if isinstance(data, bytes) and key in data]


def test_messages_quote_shown_paths_only():
  p = Pseudonyms(KEY)
  real, shown = 'dicoms/SCD01/5.dcm', p.path('dicoms/SCD01/5.dcm')
  message = f"[Errno 2] No such file: '/data/{real}' (to /elsewhere/SCD01/5.dcm)"
  scrubbed = p.scrub(message, real, shown)
  assert 'SCD01' not in scrubbed and scrubbed.count('<path>') == 2
  assert IDENTITY.scrub(message, real, real) == message
  url = 'http://127.0.0.1:8042/dicom-web/studies/1.2/series/1.3/instances/1.4'
  source = 'studies/1.2/series/1.3/instances/1.4'
  assert p.scrub(f'cannot retrieve {url}: 404', source, p.path(source)) == (
    'cannot retrieve http://127.0.0.1:8042/<path>: 404'
  )
  stray = layout.StrayFile(
    'SCD01', 'dicoms/SCD01/sub', "cannot list: '/d/dicoms/SCD01/sub'"
  )
  listed = p.listed(stray)
  assert 'SCD01' not in repr(listed) and listed.owner_id == p.patient('SCD01')


def test_without_a_key_only_the_documented_identifiers_leave(phi_runs):
  root, manifest, _, runs = phi_runs
  places = list(_places(runs['plain']))
  markers = {*sample.PHI_MARKERS.values(), sample.PHI_PRIVATE_NAME, 'PHIMARK'}
  assert not leaks(markers, places)
  text = parquet_text(runs['plain']['out'])
  assert manifest.links[0][0] in text  # the link ids, as documented


def _slices(out):
  return dataset_tables(out)['slices']


def test_the_same_key_gives_the_same_dataset_another_the_same_pixels(phi_runs):
  _, _, base, runs = phi_runs
  keyed, again = (
    dataset_tables(runs['keyed']['out']),
    dataset_tables(runs['again']['out']),
  )
  assert keyed == again
  other, plain = _slices(runs['other']['out']), _slices(runs['plain']['out'])
  back = {}
  for name in ('keyed', 'other'):
    back[name] = {
      e.pseudonym: e.original for e in keys.read_id_map(str(base / f'{name}.csv'))
    }

  def by_original(rows, name):
    found = {}
    for row in rows:
      pid = back[name][row['patient_id']] if name else row['patient_id']
      found[pid, row['slice_index']] = row
    return found

  mine, theirs, clear = (
    by_original(keyed['slices'], 'keyed'),
    by_original(other, 'other'),
    by_original(plain, None),
  )
  assert mine.keys() == theirs.keys() == clear.keys() and len(mine) > 20
  for k, row in mine.items():
    assert row['patient_id'] != theirs[k]['patient_id']
    assert row['sop_instance_uid'] != theirs[k]['sop_instance_uid']
    for column in ('image', 'i_mask', 'o_mask', 'pixel_xxh3', 'qa_flags'):
      assert row[column] == theirs[k][column] == clear[k][column], column
    # Pseudonyms never move a patient to another split.
    assert row['split'] == theirs[k]['split'] == clear[k]['split']
    # The UIDs map back to the stored ones.
    for column in ('sop_instance_uid', 'series_instance_uid', 'study_instance_uid'):
      assert back['keyed'][row[column]] == clear[k][column]


def test_the_id_map_is_private_complete_and_outside_the_dataset(phi_runs):
  _, manifest, base, runs = phi_runs
  path = str(base / 'keyed.csv')
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert not glob.glob(f'{path}.*')  # no parts or temporary files left
  entries = keys.read_id_map(path)
  assert len(entries) == len(set(entries))
  kinds = {e.kind for e in entries}
  assert {PATIENT_ID, ORIGINAL_ID, UID} <= kinds
  originals = {(e.kind, e.original) for e in entries}
  for pid, oid in manifest.links:
    assert (PATIENT_ID, pid) in originals and (ORIGINAL_ID, oid) in originals
  tables = dataset_tables(runs['keyed']['out'])
  pseudonyms = {e.pseudonym for e in entries}
  for row in tables['slices']:
    assert row['patient_id'] in pseudonyms and row['sop_instance_uid'] in pseudonyms
  for row in tables['reconciliation']:
    assert row['patient_id'] in pseudonyms | {''}
    assert row['original_id'] in pseudonyms | {''}
  assert not glob.glob(
    os.path.join(runs['keyed']['out'], '**', '*.csv'), recursive=True
  )
