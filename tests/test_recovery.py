"""Recovery after a run that filled the disk, and messages that stay true
under pseudonyms.

A run that fills the disk leaves its staging folder (``OUT/_incomplete-<run
id>/``) for the next run to remove. The next run's space check counts that
folder as free, since the run removes it before it writes; a refusal names
it, its size and how to remove it now; a live run's staging folder (its run
holds the output's lock) is never counted, nor removed, by a run or by
``vacuum``. Free space is faked (the disk is not filled); everything else is
real: the pipeline, the lock held by another process, the staging folders.

With a key, the messages that quote the layout's templates
(``dicoms/<patient_id>/<n>.dcm``) keep them whole, whatever the ids: a tree
whose ids are the templates' own words (``patient_id``, ``dicoms``, ``p``,
``1``) gives each listing message exactly as a run without a key does.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from beam_pipeline import dataset
from beam_pipeline.launch import cli, lock, preflight, publish, vacuum
from beam_pipeline.tools import sample
from transforms.contract import layout
from transforms.contract.pseudonyms import Pseudonyms
from transforms.io import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = bytes(range(32))
LEFT = 3_000_000  # bytes a dead run's staging folder holds


@pytest.fixture
def data(tmp_path):
  """A small tree and the bytes its dataset is estimated at."""
  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=2, slices=6, rows=32, columns=32)
  return root, preflight.survey(root).dataset_bytes(False)


def _fake_free(monkeypatch, out: str, free: int) -> None:
  """``free`` bytes free at ``out`` (and below it), as the space check sees."""
  real = preflight.shutil.disk_usage
  out = os.path.abspath(out)

  def disk_usage(path):
    path = os.path.abspath(os.fspath(path))
    if path == out or path.startswith(out + os.sep):
      found = real(path)
      return found._replace(free=free)
    return real(path)

  monkeypatch.setattr(preflight.shutil, 'disk_usage', disk_usage)


def _plant_staging(out: str, run_id: str, size: int = LEFT) -> str:
  """A staging folder as a run that died writing leaves it: a partial shard."""
  staging = publish.staging_path(out, run_id)
  os.makedirs(os.path.join(staging, 'slices'))
  with open(os.path.join(staging, 'slices', 'part-00000-of-00004.parquet'), 'wb') as f:
    f.write(os.urandom(size))
  return staging


def _plant_dead_lock(out: str) -> None:
  """The lock file a SIGKILLed run leaves: its record, and no flock."""
  with open(os.path.join(out, lock.LOCK_FILE), 'w') as f:
    f.write('{"pid": 999999, "host": "gone", "started": "2026-01-01T00:00:00+00:00"}')


def test_a_dead_runs_staging_folder_counts_as_free_and_goes_as_the_run_starts(
  data, tmp_path, monkeypatch, capsys
):
  root, needed = data
  out = str(tmp_path / 'OUT')
  os.makedirs(out)
  _fake_free(monkeypatch, out, needed // 2)  # short without the leftover
  argv = ['--input', root, '--output', out]
  assert cli.main(argv) == cli.EXIT_USAGE  # the check bites: nothing to count
  assert 'free some space' in capsys.readouterr().err
  staging = _plant_staging(out, '20260101-000000-deadbeef')
  _plant_dead_lock(out)
  assert cli.main(argv) == cli.EXIT_OK
  assert not os.path.exists(staging)  # removed before the job wrote
  assert dataset.check(out, full=True)[dataset.versions.VERSION] == 0
  assert not publish.staging_folders(out) and lock.holder(out) is None


def test_a_refusal_names_the_dead_runs_folder_and_vacuum_removes_it(
  data, tmp_path, monkeypatch, capsys
):
  root, needed = data
  out = str(tmp_path / 'OUT')
  os.makedirs(out)
  staging = _plant_staging(out, '20260101-000000-deadbeef', needed // 4)
  _fake_free(monkeypatch, out, 900)  # short even counting the leftover
  argv = ['--input', root, '--output', out]
  assert cli.main(argv) == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'Traceback' not in err
  assert re.search(
    r'900 bytes is free there \([0-9.]+ KB counting the [0-9.]+ KB that the '
    'staging folder of a run no longer running left, ' + re.escape(staging) + ',',
    err,
  )
  assert f'remove it now with `cardiac-mri vacuum {out}`' in err
  assert os.path.isdir(staging)  # a refused run removes nothing
  capsys.readouterr()
  assert vacuum.main([out, '--dry-run']) == 0
  assert f'would remove {staging}/' in capsys.readouterr().out
  assert os.path.isdir(staging)
  assert vacuum.main([out]) == 0  # an output with no version yet: leftovers only
  assert '0 file(s) and 1 staging folder(s)' in capsys.readouterr().out
  assert not os.path.exists(staging)
  assert cli.main(argv) == cli.EXIT_USAGE
  err = capsys.readouterr().err
  assert 'staging' not in err and 'free some space' in err


_HOLDER = """
import sys, time
from beam_pipeline.launch import lock, publish
out, run_id = sys.argv[1], sys.argv[2]
with lock.hold(out, run_id):
  staging = publish.staging_path(out, run_id)
  import os
  os.makedirs(os.path.join(staging, 'slices'))
  with open(os.path.join(staging, 'slices', 'part-00000-of-00001.parquet'), 'wb') as f:
    f.write(b'x' * 3_000_000)
    f.flush()
  print('holding', flush=True)
  time.sleep(600)
"""


def test_a_live_runs_staging_folder_is_never_counted_nor_removed(
  data, tmp_path, monkeypatch, capsys
):
  root, needed = data
  out = str(tmp_path / 'OUT')
  os.makedirs(out)
  run_id = '20260101-000000-a11ve000'
  env = {**os.environ, 'PYTHONPATH': REPO}
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, out, run_id],
    stdout=subprocess.PIPE,
    env=env,
  )
  try:
    assert holder.stdout.readline() == b'holding\n'
    staging = publish.staging_path(out, run_id)
    shard = os.path.join(staging, 'slices', 'part-00000-of-00001.parquet')
    assert f'pid {holder.pid} on' in lock.holder(out)
    # counted as free it would fit; held by a live run it must not count
    _fake_free(monkeypatch, out, needed // 2)
    argv = ['--input', root, '--output', out]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count('\n') == 1
    assert f'staging folder {staging} while another run uses this output' in err
    assert f'(pid {holder.pid} on' in err and 'wait for that run to finish' in err
    assert os.path.getsize(shard) == 3_000_000
    # with the space check passed, the lock refuses; vacuum too
    _fake_free(monkeypatch, out, 10**12)
    assert cli.main(argv) == cli.EXIT_USAGE
    assert 'is in use by another run' in capsys.readouterr().err
    assert vacuum.main([out]) == 2
    assert os.path.getsize(shard) == 3_000_000
    holder.send_signal(signal.SIGKILL)  # now a dead run's folder, and lock file
    holder.wait(timeout=30)
    assert os.path.exists(os.path.join(out, lock.LOCK_FILE))
    assert lock.holder(out) is None
    _fake_free(monkeypatch, out, needed // 2)
    assert cli.main(argv) == cli.EXIT_OK
    assert not os.path.exists(staging)
  finally:
    holder.kill()
    holder.wait(timeout=30)


# -- messages that stay true under pseudonyms --------------------------------

# Ids that are the layout's own words (and short enough to be inside others).
_LINKS = (('patient_id', 'dicoms'), ('p', '1'), ('dicoms', 'patient_id'), ('1', 'p'))


def _colliding_tree(root: str, outside: str) -> None:
  """A generated tree whose ids are _LINKS, with one entry of each kind the
  listing reports (and a slice linked outside the input, read-stage)."""
  manifest = sample.make_tree(root, patients=4, slices=2, rows=16, columns=16)
  links = sorted({(s.patient_id, s.original_id) for s in manifest.slices.values()})
  names = dict(zip(links, _LINKS, strict=True))
  for (pid, oid), (new_pid, new_oid) in names.items():
    os.rename(f'{root}/dicoms/{pid}', f'{root}/dicoms/.{new_pid}')
    os.rename(f'{root}/contourfiles/{oid}', f'{root}/contourfiles/.{new_oid}')
  for new_pid, new_oid in _LINKS:
    os.rename(f'{root}/dicoms/.{new_pid}', f'{root}/dicoms/{new_pid}')
    os.rename(f'{root}/contourfiles/.{new_oid}', f'{root}/contourfiles/{new_oid}')
  with open(f'{root}/link.csv', 'w') as f:
    f.write('patient_id,original_id\n')
    f.writelines(f'{pid},{oid}\n' for pid, oid in _LINKS)
    f.write('p,patient_id\n')  # a duplicate row: its detail quotes both ids
  for path in (
    'dicoms/p/x/2.dcm',  # too deep
    'dicoms/1/notes.txt',  # not <n>.dcm
    'dicoms/p.dcm',  # not in a patient folder
    'contourfiles/1/x-contours/IM-0001-0001-icontour-manual.txt',
    'contourfiles/dicoms/i-contours/notes.txt',
    'contourfiles/p/o-contours/IM-0001-0001-icontour-manual.txt',  # wrong kind
  ):
    os.makedirs(os.path.dirname(f'{root}/{path}'), exist_ok=True)
    with open(f'{root}/{path}', 'w') as f:
      f.write('x')
  os.mkfifo(f'{root}/dicoms/patient_id/9.dcm')
  os.symlink(f'{root}/nowhere', f'{root}/dicoms/dicoms/7.dcm')
  os.symlink(f'{root}/dicoms/p', f'{root}/dicoms/1/sub')
  os.mkdir(f'{root}/dicoms/p/5.dcm')  # a folder where a slice goes
  with open(os.path.join(os.fsencode(root), b'dicoms/p/\xff.dcm'), 'wb') as f:
    f.write(b'x')
  shutil.copy(f'{root}/dicoms/p/1.dcm', outside)
  os.symlink(outside, f'{root}/dicoms/1/3.dcm')


def _run(root: str, out: str, *args: str) -> dict:
  assert cli.main(['--input', root, '--output', out, *args]) == cli.EXIT_DROPPED
  return {
    'errors': dataset.read_errors(out).to_pylist(),
    'reconciliation': dataset.read_reconciliation(out).to_pylist(),
  }


def test_listing_messages_keep_the_layouts_templates_whatever_the_ids(tmp_path):
  root, outside = str(tmp_path / 'DATA'), str(tmp_path / 'elsewhere.dcm')
  _colliding_tree(root, outside)
  key = tmp_path / 'key'
  key.write_bytes(KEY)
  key.chmod(0o600)
  plain = _run(root, str(tmp_path / 'PLAIN'))
  keyed = _run(root, str(tmp_path / 'KEYED'), '--pseudonymize-key-file', str(key))

  def listing(rows):
    return collections.Counter(r['error'] for r in rows if r['stage'] == 'list')

  shown = listing(keyed['errors'])
  assert shown == listing(plain['errors'])  # word for word, as without a key
  for reason in (
    f'not used: not at {layout.DICOM_PLACE}',
    f'not used: file name is not {layout.DICOM_NAME} with n = 1, 2, 3 ...',
    f'not used: not at {layout.CONTOUR_PLACE}',
    f'not used: file name is not {layout.CONTOUR_NAME}',
    'not used: a icontour file in the o-contours folder',
    'not used: not a regular file (FIFO, socket or device)',
    'not used: broken symlink',
    'not used: symlinked folder, not followed',
    'not used: empty folder',
    f'not used: {files.NOT_UTF8}',
  ):
    assert shown[reason], (reason, shown)
  assert 'dicoms/<patient_id>/<n>.dcm' in str(shown)  # as the docs print it
  # the paths name pseudonyms only: no folder keeps its id
  p = Pseudonyms(KEY)
  for row in keyed['errors']:
    top, owner, *_ = row['path'].split('/') + ['']
    if top == 'dicoms' and row['path'].count('/') > 1:
      assert owner in {p.patient(pid) for pid, _ in _LINKS}, row
    if top == 'contourfiles' and row['path'].count('/') > 1:
      assert owner in {p.original(oid) for _, oid in _LINKS}, row
  (read,) = [r for r in keyed['errors'] if r['stage'] == 'read']
  assert '(to <path>)' in read['error'] and outside not in read['error']
  (duplicate,) = [r for r in keyed['reconciliation'] if r['status'] == 'duplicate_link']
  assert duplicate['detail'] == (
    f'line 6: patient_id {p.patient("p")!r} (pseudonym) is already linked on line 3; '
    'this row is not used'
  )


@pytest.mark.parametrize('real', ['1', 'p', 'patient_id', 'dicoms', 'HTTP'])
def test_an_id_is_scrubbed_where_it_stands_as_an_id_only(real):
  """A PACS search's message scrubbed of the id as written: the id goes
  wherever it is a word or path component; numbers, words and UIDs that
  merely contain it stay, and so do the layout's templates."""
  p = Pseudonyms(KEY)
  shown = p.patient(real)
  message = (
    f'QIDO-RS search for PatientID {real}: HTTP 503 Service Unavailable after '
    f'3 attempts (GET /dicom-web/instances?PatientID={real}); 1.2.840.10008 '
    f'at {layout.DICOM_PLACE}, {real}.'
  )
  scrubbed = p.scrub(message, real, shown)
  http = shown if real == 'HTTP' else 'HTTP'  # a word of its own: it goes
  assert scrubbed == (
    f'QIDO-RS search for PatientID {shown}: {http} 503 Service Unavailable after '
    f'3 attempts (GET <path>); 1.2.840.10008 at {layout.DICOM_PLACE}, {shown}.'
  )
  assert p.scrub(
    f'not at {layout.DICOM_PLACE}', f'dicoms/{real}/x/y', 'dicoms/P/N/N'
  ) == (f'not at {layout.DICOM_PLACE}')
