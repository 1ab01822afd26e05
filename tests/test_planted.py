"""Files planted where the pipeline writes (issue 35, defect 1): a symbolic
link, a FIFO or a hard link as OUT/_LOCK is refused, and nothing it leads
to is touched."""

import contextlib
import glob
import os
import pathlib
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import NamedTuple

import pytest

from beam_pipeline.dataset import versions
from beam_pipeline.launch import cli, lock, publish
from beam_pipeline.launch import run as run_module
from beam_pipeline.tools import keys, qa, sample
from transforms.contract import local_files
from transforms.io import stores


@pytest.fixture
def small(tmp_path):
  root, out = str(tmp_path / 'DATA'), str(tmp_path / 'OUT')
  sample.make_tree(root, patients=1, slices=2, rows=16, columns=16)
  os.makedirs(out)
  victim = tmp_path / 'victim.txt'
  victim.write_text("the operator's own file\n")
  return root, out, victim


def _run(root, out) -> int:
  return cli.main(['--input', root, '--output', out])


def _refused(capsys, what: str) -> None:
  err = capsys.readouterr().err
  assert f'is not a lock file this pipeline made ({what})' in err
  assert 'Traceback' not in err


def test_a_symlink_as_the_lock_is_refused_and_its_target_untouched(small, capsys):
  root, out, victim = small
  os.symlink(victim, os.path.join(out, lock.LOCK_FILE))
  assert _run(root, out) == cli.EXIT_USAGE
  _refused(capsys, 'a symbolic link')
  assert victim.read_text() == "the operator's own file\n"
  assert sorted(os.listdir(out)) == [lock.LOCK_FILE]  # nothing written


def test_a_dangling_symlink_creates_nothing_where_it_points(small, tmp_path, capsys):
  root, out, _ = small
  target = tmp_path / 'made-by-the-run'
  os.symlink(target, os.path.join(out, lock.LOCK_FILE))
  assert _run(root, out) == cli.EXIT_USAGE
  _refused(capsys, 'a symbolic link')
  assert not target.exists()


def test_a_fifo_as_the_lock_is_refused_without_waiting(small, capsys):
  root, out, _ = small
  os.mkfifo(os.path.join(out, lock.LOCK_FILE))
  result = []
  runner = threading.Thread(target=lambda: result.append(_run(root, out)), daemon=True)
  runner.start()
  runner.join(60)
  assert result == [cli.EXIT_USAGE]
  _refused(capsys, 'not a regular file')


def test_a_hard_link_as_the_lock_is_refused_and_its_file_untouched(small, capsys):
  root, out, victim = small
  os.link(victim, os.path.join(out, lock.LOCK_FILE))
  assert _run(root, out) == cli.EXIT_USAGE
  _refused(capsys, 'a file with 2 links')
  assert victim.read_text() == "the operator's own file\n"


def test_a_plain_lock_file_still_works(small):
  root, out, _ = small
  with open(os.path.join(out, lock.LOCK_FILE), 'w') as f:
    f.write('{}')
  assert _run(root, out) == cli.EXIT_OK
  assert not os.path.exists(os.path.join(out, lock.LOCK_FILE))


# ---------------------------------------------------------------------------
# Everything else the launcher writes: the output's folders and the run's own
# names in it, the staging folder, the QA folder, the id map, its lock and
# its parts, and the secrets it reads.

_VICTIM_TEXT = "the operator's own file\n"


@pytest.fixture
def cohort(tmp_path):
  """A small tree, a key, and the operator's own file and folder outside
  everything the run is told to write (what a planted link leads to)."""
  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=2, slices=3, rows=16, columns=16)
  key = str(tmp_path / 'key')
  keys.generate(key)
  victim = tmp_path / 'victim.txt'
  victim.write_text(_VICTIM_TEXT)
  victim_dir = tmp_path / 'victim-dir'
  victim_dir.mkdir()
  (victim_dir / 'keep.txt').write_text(_VICTIM_TEXT)
  return Cohort(
    root, str(tmp_path / 'OUT'), key, str(tmp_path / 'map.csv'), victim, victim_dir
  )


class Cohort(NamedTuple):
  root: str
  out: str
  key: str
  id_map: str
  victim: pathlib.Path
  victim_dir: pathlib.Path

  def args(self, *more, id_map=True):
    keyed = ['--pseudonymize-key-file', self.key]
    if id_map:
      keyed += ['--id-map', self.id_map]
    return ['--input', self.root, '--output', self.out, *keyed, *more]

  def untouched(self) -> None:
    assert self.victim.read_text() == _VICTIM_TEXT
    assert sorted(os.listdir(self.victim_dir)) == ['keep.txt']
    assert (self.victim_dir / 'keep.txt').read_text() == _VICTIM_TEXT


def _main(args, seconds=180) -> int:
  """cli.main(args) in a thread: a run that waits on a FIFO fails the test
  instead of hanging it."""
  result = []
  runner = threading.Thread(target=lambda: result.append(cli.main(args)), daemon=True)
  runner.start()
  runner.join(seconds)
  assert result, f'the run did not end within {seconds} s (waiting on a FIFO?)'
  return result[0]


def _one_error(capsys, *needles) -> str:
  """The one 'error:' line on stderr (no traceback), holding ``needles``."""
  err = capsys.readouterr().err
  assert 'Traceback' not in err, err
  lines = [line for line in err.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, err
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def _plant(path, how, target) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if how == 'symlink':
    os.symlink(target, path)
  else:
    os.mkfifo(path)


def _left_beside(id_map) -> list[str]:
  return sorted(glob.glob(glob.escape(id_map) + '.*'))


def _map_ids(id_map) -> set[str]:
  return {e.original for e in keys.read_id_map(id_map) if e.kind == 'patient_id'}


@pytest.mark.parametrize('how', ['symlink', 'fifo'])
@pytest.mark.parametrize(
  'entry',
  ['slices', 'reconciliation', 'errors', 'slices/_delta_log', '_SUMMARY.json'],
)
def test_a_link_or_fifo_where_the_output_holds_its_tables_is_refused(
  cohort, entry, how, capsys
):
  os.makedirs(cohort.out)
  path = os.path.join(cohort.out, entry)
  target = cohort.victim if entry == '_SUMMARY.json' else cohort.victim_dir
  _plant(path, how, target)
  what = 'a symbolic link' if how == 'symlink' else 'a FIFO'
  wanted = 'a file' if entry == '_SUMMARY.json' else 'a folder'
  # --overwrite too: a dataset may be replaced, never written through a link
  assert _main(cohort.args('--overwrite', id_map=False)) == cli.EXIT_USAGE
  _one_error(capsys, f'{path} is {what}, not {wanted} this pipeline made; remove it')
  cohort.untouched()
  assert not glob.glob(os.path.join(cohort.out, '_incomplete*'))


@pytest.mark.parametrize('how', ['symlink', 'fifo'])
def test_links_at_the_names_a_run_publishes_are_replaced_never_followed(
  cohort, how, monkeypatch, capsys
):
  """The run's staging folder, the published files of each table: planted
  under the run's own names (its id made known here), each is replaced by
  the run's file or removed, and nothing is written where a link leads."""
  assert cli.main(cohort.args(id_map=False)) == cli.EXIT_OK  # version 0
  monkeypatch.setattr(lock, 'new_run_id', lambda: 'RUN2')
  staging = os.path.join(cohort.out, '_incomplete-RUN2')
  _plant(staging, how, cohort.victim_dir)  # and every file staging holds
  for name in ('_PINNED_SPLITS.json', '_PREVIOUS.json', '_INPUTS.json'):
    os.symlink(cohort.victim, cohort.victim_dir / name)
  published = [
    os.path.join(cohort.out, table, 'part-RUN2-00000-of-00001.parquet')
    for table in ('slices', 'reconciliation', 'errors')
  ]
  for path in published:
    _plant(path, how, cohort.victim)
  assert _main(cohort.args('--full', id_map=False)) == cli.EXIT_OK
  assert cohort.victim.read_text() == _VICTIM_TEXT
  for name in ('_PINNED_SPLITS.json', '_PREVIOUS.json', '_INPUTS.json'):
    assert os.path.islink(cohort.victim_dir / name)  # nothing written through
  assert sorted(os.listdir(cohort.victim_dir))[-1] == 'keep.txt'
  for path in published:
    assert stat.S_ISREG(os.lstat(path).st_mode), path
  assert not os.path.lexists(staging)
  err = capsys.readouterr().err
  assert f'removing {staging}, left by an interrupted run' in err
  assert versions.latest(cohort.out) == 1
  assert cli.command(['verify', cohort.out]) == cli.EXIT_OK


def test_a_staging_folder_planted_after_the_clearing_stops_the_run(
  cohort, monkeypatch, capsys
):
  monkeypatch.setattr(lock, 'new_run_id', lambda: 'RUN1')
  staging = os.path.join(cohort.out, '_incomplete-RUN1')
  clear = publish.clear_staging

  def clear_then_plant(output):
    clear(output)
    os.symlink(cohort.victim_dir, staging)

  monkeypatch.setattr(publish, 'clear_staging', clear_then_plant)
  assert _main(cohort.args(id_map=False)) == cli.EXIT_USAGE
  _one_error(capsys, f'{staging} exists, made by something else than this run')
  cohort.untouched()
  assert not publish.is_table(cohort.out)


def test_the_staging_folder_is_private(cohort, monkeypatch):
  modes = []
  build = run_module.build_pipeline

  def build_and_look(p, job):
    modes.append(stat.S_IMODE(os.lstat(job.staging).st_mode))
    return build(p, job)

  monkeypatch.setattr(run_module, 'build_pipeline', build_and_look)
  previous = os.umask(0o022)
  try:
    assert cli.main(cohort.args(id_map=False)) == cli.EXIT_OK
  finally:
    os.umask(previous)
  assert modes == [0o700]


@pytest.mark.parametrize('how', ['symlink', 'fifo'])
def test_links_and_fifos_where_the_qa_page_writes_files_are_replaced(
  cohort, how, tmp_path
):
  qa_dir = str(tmp_path / 'QA')
  pids = ['SCD0000101', 'SCD0000102']
  planted = [os.path.join(qa_dir, qa.INDEX)]
  planted += [os.path.join(qa_dir, f'{pid}.png') for pid in pids]
  planted += [
    os.path.join(qa_dir, qa.overlay_path(pid, k)) for pid in pids for k in (1, 2, 3)
  ]
  for path in planted:
    _plant(path, how, cohort.victim)
  args = ['--input', cohort.root, '--output', cohort.out, '--qa-dir', qa_dir]
  assert _main(args) == cli.EXIT_OK
  cohort.untouched()
  written = [p for p in planted if stat.S_ISREG(os.lstat(p).st_mode)]
  assert planted[0] in written and planted[1] in written and planted[2] in written
  assert len(written) > 3  # the overlays of the labelled slices too
  with open(planted[0], encoding='utf-8') as f:
    assert f.read().startswith('<!doctype html>')
  assert not [n for n in os.listdir(qa_dir) if n.endswith('.tmp')]


@pytest.mark.parametrize('where', ['slices', 'slices/SCD0000101'])
def test_a_link_where_the_qa_page_makes_a_folder_is_refused_before_the_run(
  cohort, where, tmp_path, capsys
):
  qa_dir = str(tmp_path / 'QA')
  path = os.path.join(qa_dir, where)
  _plant(path, 'symlink', cohort.victim_dir)
  args = ['--input', cohort.root, '--output', cohort.out, '--qa-dir', qa_dir]
  assert _main(args) == cli.EXIT_USAGE
  _one_error(capsys, f'{path} is a symbolic link, not a folder this pipeline made')
  cohort.untouched()
  assert not os.path.exists(cohort.out)  # nothing ran
  # the qa command alone refuses it too
  assert cli.main(['--input', cohort.root, '--output', cohort.out]) == cli.EXIT_OK
  capsys.readouterr()
  assert cli.command(['qa', cohort.out, qa_dir]) == cli.EXIT_USAGE
  _one_error(capsys, f'{path} is a symbolic link')
  cohort.untouched()


@pytest.mark.parametrize(
  'how', ['symlink', 'dangling symlink', 'fifo', 'hard link', 'folder']
)
@pytest.mark.parametrize('overwrite', [False, True])
def test_anything_but_an_id_map_at_the_id_map_is_refused_even_with_overwrite(
  cohort, how, overwrite, tmp_path, capsys
):
  dangling = tmp_path / 'made-by-the-run'
  if how == 'symlink':
    os.symlink(cohort.victim, cohort.id_map)
  elif how == 'dangling symlink':
    os.symlink(dangling, cohort.id_map)
  elif how == 'fifo':
    os.mkfifo(cohort.id_map)
  elif how == 'hard link':
    os.link(cohort.victim, cohort.id_map)
  else:
    os.mkdir(cohort.id_map)
  more = ['--overwrite'] if overwrite else []
  assert _main(cohort.args(*more)) == cli.EXIT_USAGE
  what = {
    'symlink': 'a symbolic link',
    'dangling symlink': 'a symbolic link',
    'fifo': 'a FIFO',
    'hard link': 'a file with 2 links',
    'folder': 'a folder',
  }[how]
  _one_error(capsys, f'--id-map {cohort.id_map} is {what}, not an id map')
  cohort.untouched()
  assert not dangling.exists()
  assert not os.path.exists(cohort.out)  # refused before anything
  assert _left_beside(cohort.id_map) == []


@pytest.mark.parametrize('how', ['symlink', 'fifo'])
def test_a_link_or_fifo_as_the_id_maps_lock_is_refused(cohort, how, capsys):
  path = keys.lock_path(cohort.id_map)
  _plant(path, how, cohort.victim)
  assert _main(cohort.args()) == cli.EXIT_USAGE
  what = 'a symbolic link' if how == 'symlink' else 'not a regular file'
  _one_error(
    capsys,
    f'--id-map {cohort.id_map}: {path} is not a lock file this pipeline made ({what})',
    'if no run is using this id map',
  )
  cohort.untouched()
  assert not os.path.exists(cohort.id_map)


def test_links_where_the_id_maps_parts_go_are_removed_never_followed(
  cohort, monkeypatch, capsys
):
  """A link planted as this run's parts folder or staged map (its run id
  made known here), and as a dead run's: each removed as a leftover, the run
  completes, nothing is written where they lead."""
  monkeypatch.setattr(lock, 'new_run_id', lambda: 'RUN1')
  planted = [
    keys.parts_folder(cohort.id_map, 'RUN1'),
    f'{cohort.id_map}.tmp-RUN1',
    keys.parts_folder(cohort.id_map, '20260101-000000-deadbeef'),
    f'{cohort.id_map}.tmp-4242',  # an older release's staged map
  ]
  os.symlink(cohort.victim_dir, planted[0])
  os.symlink(cohort.victim, planted[1])
  os.mkfifo(planted[2])
  os.symlink(cohort.victim, planted[3])
  # another map's, whose name starts with this one's: not a leftover of it
  theirs = cohort.id_map + '.parts-of-another-map.csv'
  with open(theirs, 'w') as f:
    f.write('kind,original,pseudonym\n')
  assert _main(cohort.args()) == cli.EXIT_OK
  cohort.untouched()
  assert _map_ids(cohort.id_map) == {'SCD0000101', 'SCD0000102'}
  assert _left_beside(cohort.id_map) == [theirs]
  err = capsys.readouterr().err
  for path in planted:
    assert f'removing {path}: left by a run of this --id-map' in err


def test_a_parts_folder_planted_after_the_clearing_stops_the_run(
  cohort, monkeypatch, capsys
):
  monkeypatch.setattr(lock, 'new_run_id', lambda: 'RUN1')
  parts = keys.parts_folder(cohort.id_map, 'RUN1')
  clear = keys.remove_leftovers

  def clear_then_plant(id_map, run_id):
    clear(id_map, run_id)
    os.symlink(cohort.victim_dir, parts)

  monkeypatch.setattr(keys, 'remove_leftovers', clear_then_plant)
  assert _main(cohort.args()) == cli.EXIT_USAGE
  _one_error(capsys, f'{parts} exists, made by something else than this run')
  cohort.untouched()
  assert not os.path.exists(cohort.id_map)
  assert _left_beside(cohort.id_map) == []  # the planted link too: removed
  assert not os.path.exists(cohort.out) or not publish.is_table(cohort.out)


def test_the_id_map_and_its_parts_are_private_from_their_first_byte(
  cohort, monkeypatch
):
  """Under umask 022 (files 0644 by default), every file made beside the id
  map is created by os.open with mode 0600 (checked on the new descriptor,
  before its first byte), every folder 0700, nothing through open() or a
  chmod; while the job's parts are there, they are 0700/0600."""
  prefix = cohort.id_map + '.'
  made, folders, other = [], [], []
  real_open = os.open

  def watching_open(path, flags, mode=0o777, *, dir_fd=None):
    fd = real_open(path, flags, mode, dir_fd=dir_fd)
    name = os.fsdecode(path)
    if flags & os.O_CREAT and name.startswith(prefix):  # the lock too
      found = os.fstat(fd)
      made.append((name, stat.S_IMODE(found.st_mode), found.st_size))
    return fd

  def audit(event, args):
    if not watching:
      return
    if event == 'os.mkdir' and str(args[0]).startswith(prefix):
      folders.append((str(args[0]), args[1]))
    elif event in ('os.chmod', 'os.chown') and str(args[0]).startswith(prefix):
      other.append((event, args))
    elif event == 'open' and isinstance(args[1], str) and 'r' not in args[1]:
      if str(args[0]).startswith(prefix) or str(args[0]) == cohort.id_map:
        other.append((event, args))

  watching = True
  sys.addaudithook(audit)
  monkeypatch.setattr(os, 'open', watching_open)
  seen = {}
  stage = keys.stage_id_map

  def look_then_stage(parts, id_map, run_id, overwrite):
    seen['folder'] = stat.S_IMODE(os.lstat(parts).st_mode)
    seen['parts'] = {
      p: stat.S_IMODE(os.lstat(p).st_mode) for p in glob.glob(f'{parts}/*.csv')
    }
    return stage(parts, id_map, run_id, overwrite)

  monkeypatch.setattr(keys, 'stage_id_map', look_then_stage)
  previous = os.umask(0o022)
  try:
    assert cli.main(cohort.args()) == cli.EXIT_OK
  finally:
    os.umask(previous)
    watching = False
  assert seen['folder'] == 0o700
  assert seen['parts'] and set(seen['parts'].values()) == {0o600}, seen
  assert {mode for _, mode in folders} == {0o700} and folders, folders
  parts = [m for m in made if '.parts-' in m[0]]
  staged = [m for m in made if '.tmp-' in m[0]]
  assert parts and staged and (keys.lock_path(cohort.id_map), 0o600, 0) in made, made
  assert {(mode, size) for _, mode, size in made} == {(0o600, 0)}, made
  assert other == []
  assert stat.S_IMODE(os.stat(cohort.id_map).st_mode) == 0o600
  assert _left_beside(cohort.id_map) == []


def test_an_id_map_made_while_the_run_ran_is_not_replaced(cohort, monkeypatch, capsys):
  theirs = 'kind,original,pseudonym\npatient_id,THEIRS,PTHEIRS\n'
  stage = keys.stage_id_map

  def made_meanwhile(*args):
    with open(cohort.id_map, 'w') as f:
      f.write(theirs)
    return stage(*args)

  monkeypatch.setattr(keys, 'stage_id_map', made_meanwhile)
  assert _main(cohort.args()) == cli.EXIT_USAGE
  _one_error(
    capsys,
    f'--id-map {cohort.id_map} exists',
    'it appeared while this run ran',
    'nothing of this run was published',
  )
  with open(cohort.id_map) as f:
    assert f.read() == theirs
  assert _left_beside(cohort.id_map) == []  # parts, staged map, lock: removed
  assert not publish.is_table(cohort.out)  # no version of a dataset without its map


def test_an_id_map_taken_in_the_instant_before_it_is_put_is_kept_beside(cohort):
  """put_id_map alone: the map appeared after stage_id_map looked."""
  parts = keys.make_parts(cohort.id_map, 'RUN1')
  with open(os.path.join(parts, 'part-00000-of-00001.csv'), 'w') as f:
    f.write('patient_id,SCD0000101,PX\n')
  staged = keys.stage_id_map(parts, cohort.id_map, 'RUN1', overwrite=False)
  with open(cohort.id_map, 'w') as f:
    f.write('theirs\n')
  said = keys.put_id_map(staged, overwrite=False)
  kept = f'{cohort.id_map}.RUN1'
  assert said.startswith(f'{kept} (1 rows') and f'NOT at {cohort.id_map}' in said
  assert open(cohort.id_map).read() == 'theirs\n'
  assert _map_ids(kept) == {'SCD0000101'}
  assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600


def _staged(cohort, run_id='RUN1') -> keys.StagedMap:
  parts = keys.make_parts(cohort.id_map, run_id)
  with open(os.path.join(parts, 'part-00000-of-00001.csv'), 'w') as f:
    f.write('patient_id,SCD0000101,PX\n')
  return keys.stage_id_map(parts, cohort.id_map, run_id, overwrite=False)


def test_an_id_map_whose_kept_name_is_taken_too_is_kept_under_a_fresh_name(cohort):
  """Anyone who may write in the map's folder and knows the run id (the
  staging folder's name says it) takes both M and M.<run id> first: the map
  goes to a name drawn at random, made exclusively, and the summary says it."""
  staged = _staged(cohort)
  for taken in (cohort.id_map, f'{cohort.id_map}.RUN1'):
    with open(taken, 'w') as f:
      f.write('theirs\n')
  said = keys.put_id_map(staged, overwrite=False)
  kept = said.split(' ', 1)[0]
  assert kept.startswith(f'{cohort.id_map}.RUN1-') and len(kept) > len(cohort.id_map)
  assert f'NOT at {cohort.id_map}: it appeared meanwhile' in said
  assert _map_ids(kept) == {'SCD0000101'}
  assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
  for taken in (cohort.id_map, f'{cohort.id_map}.RUN1'):
    assert open(taken).read() == 'theirs\n'
  assert not os.path.lexists(staged.path)


def test_an_id_map_that_cannot_be_put_anywhere_stays_staged_and_says_so(
  cohort, monkeypatch
):
  staged = _staged(cohort)
  real_put = local_files.Folder.put

  def refused(self, source, name, replace=True):
    if name.startswith(os.path.basename(cohort.id_map)):
      raise PermissionError(13, 'Permission denied')
    return real_put(self, source, name, replace)

  monkeypatch.setattr(local_files.Folder, 'put', refused)
  said = keys.put_id_map(staged, overwrite=False)  # never raises
  assert said.startswith(f'{staged.path} (1 rows'), said
  assert f'NOT at {cohort.id_map}: Permission denied' in said
  assert 'before the next run of this --id-map' in said
  assert _map_ids(staged.path) == {'SCD0000101'}


def test_a_published_runs_map_is_kept_when_its_names_are_taken_meanwhile(
  cohort, monkeypatch, capsys
):
  """M and M.<run id> made after the run staged its map: the version is
  published, so the run's map is kept under a fresh name (never removed
  with the run's files), the run ends normally and its summary says where."""
  monkeypatch.setattr(lock, 'new_run_id', lambda: 'RUN1')
  stage = keys.stage_id_map

  def stage_then_take(*args):
    staged = stage(*args)
    for taken in (cohort.id_map, f'{cohort.id_map}.RUN1'):
      with open(taken, 'w') as f:
        f.write('theirs\n')
    return staged

  monkeypatch.setattr(keys, 'stage_id_map', stage_then_take)
  assert _main(cohort.args()) == cli.EXIT_OK
  out = capsys.readouterr().out
  kept = glob.glob(glob.escape(cohort.id_map) + '.RUN1-*')
  assert len(kept) == 1, _left_beside(cohort.id_map)
  assert f'{kept[0]} (' in out and f'NOT at {cohort.id_map}' in out
  assert _map_ids(kept[0]) == {'SCD0000101', 'SCD0000102'}
  assert open(cohort.id_map).read() == 'theirs\n'
  assert _left_beside(cohort.id_map) == sorted([f'{cohort.id_map}.RUN1', kept[0]])
  assert versions.latest(cohort.out) == 0


def test_a_failure_after_publishing_keeps_the_staged_map_and_says_so(
  cohort, monkeypatch, capsys
):
  """The version is committed, then putting the map fails in a way nobody
  foresaw: the staged map, the only copy, stays; the one line says the
  version is published and where its map is."""
  monkeypatch.setattr(lock, 'new_run_id', lambda: 'RUN1')

  def broken(staged, overwrite):
    raise RuntimeError('a bug')

  monkeypatch.setattr(keys, 'put_id_map', broken)
  assert _main(cohort.args()) == cli.EXIT_FAILED
  staged = f'{cohort.id_map}.tmp-RUN1'
  rows = len(keys.read_id_map(staged))
  _one_error(
    capsys,
    f'version 0 of {cohort.out} is published and complete',
    f'its id map: {staged} ({rows} rows; NOT at {cohort.id_map}: move it there '
    'before the next run of this --id-map, which removes it); then',
    'then putting the id map in place failed: RuntimeError: a bug',
  )
  assert versions.latest(cohort.out) == 0
  assert {e.original for e in keys.read_id_map(staged) if e.kind == 'patient_id'} == {
    'SCD0000101',
    'SCD0000102',
  }
  assert _left_beside(cohort.id_map) == [staged]  # no parts, no lock


def test_the_locks_are_private(tmp_path):
  """The lock names its run id, from which the names of the run's files
  follow: 0600 under umask 022, and a 0644 one a dead run left is made 0600
  when taken over."""
  path = str(tmp_path / 'map.csv.lock')
  previous = os.umask(0o022)
  try:
    with lock.hold_file(path, 'RUN1', f'--id-map {tmp_path}/map.csv', 'id map'):
      assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path, 'w') as f:  # a dead run's, as an older release made it
      f.write('{"run_id": "RUN0"}')
    os.chmod(path, 0o644)
    with lock.hold_file(path, 'RUN1', f'--id-map {tmp_path}/map.csv', 'id map'):
      assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  finally:
    os.umask(previous)


# A run held just before it stages its id map (its job done, its parts
# written, the id map's lock held), until the file GO exists.
_HELD = """
import os, sys, time
from beam_pipeline.launch import cli
from beam_pipeline.tools import keys
ready, go = sys.argv[1], sys.argv[2]
stage = keys.stage_id_map
def held(*args):
  open(ready, 'w').close()
  while not os.path.exists(go):
    time.sleep(0.05)
  return stage(*args)
keys.stage_id_map = held
sys.exit(cli.main(sys.argv[3:]))
"""


@contextlib.contextmanager
def _held_run(tmp_path, args):
  """A run in a subprocess, held with its parts written and the id map's
  lock taken: yields (process, go file)."""
  ready, go = tmp_path / 'ready', tmp_path / 'go'
  process = subprocess.Popen(
    [sys.executable, '-c', _HELD, str(ready), str(go), *args],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  try:
    deadline = time.monotonic() + 180
    while not ready.exists():
      assert process.poll() is None, process.communicate()[1].decode()[-2000:]
      assert time.monotonic() < deadline, 'the held run never got to its id map'
      time.sleep(0.1)
    yield process, go
  finally:
    if process.poll() is None:
      process.kill()
    process.communicate()


def test_two_runs_with_one_id_map_the_second_is_refused_the_first_completes(
  cohort, tmp_path, capsys
):
  other = str(tmp_path / 'OTHER')
  sample.make_tree(other, patients=3, slices=3, rows=16, columns=16)
  with _held_run(tmp_path, cohort.args()) as (first, go):
    parts = glob.glob(glob.escape(cohort.id_map) + '.parts-*')
    assert len(parts) == 1 and glob.glob(f'{parts[0]}/*.csv')
    second = [
      '--input',
      other,
      '--output',
      str(tmp_path / 'OUT2'),
      '--pseudonymize-key-file',
      cohort.key,
      '--id-map',
      cohort.id_map,
    ]
    assert _main(second) == cli.EXIT_USAGE
    _one_error(
      capsys,
      f'--id-map {cohort.id_map} is in use by another run (pid {first.pid}',
      'wait for it to finish, or choose another --id-map',
    )
    assert not publish.is_table(str(tmp_path / 'OUT2'))
    assert glob.glob(f'{parts[0]}/*.csv')  # the first run's parts untouched
    go.touch()
    _, err = first.communicate(timeout=180)
    assert first.returncode == cli.EXIT_OK, err.decode()[-2000:]
  assert _map_ids(cohort.id_map) == {'SCD0000101', 'SCD0000102'}
  assert _left_beside(cohort.id_map) == []
  # and once it is done, the map is not replaced without --overwrite
  assert _main(second) == cli.EXIT_USAGE
  _one_error(capsys, f'--id-map {cohort.id_map} exists: add --overwrite')
  assert _map_ids(cohort.id_map) == {'SCD0000101', 'SCD0000102'}


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_leaves_no_part_of_its_id_map(cohort, tmp_path, signum):
  with _held_run(tmp_path, cohort.args()) as (first, _):
    assert glob.glob(glob.escape(cohort.id_map) + '.parts-*/*.csv')
    first.send_signal(signum)
    _, err = first.communicate(timeout=60)
  assert first.returncode == 128 + signum, err.decode()[-2000:]
  assert 'nothing published' in err.decode()
  assert not os.path.exists(cohort.id_map)
  assert _left_beside(cohort.id_map) == []


def test_a_failed_run_leaves_no_part_of_its_id_map(cohort, monkeypatch, capsys):
  def broken(*args):
    raise RuntimeError('the disk went away')

  monkeypatch.setattr(publish, 'take_manifests', broken)
  assert _main(cohort.args()) == cli.EXIT_FAILED
  _one_error(capsys, 'the disk went away')
  assert not os.path.exists(cohort.id_map)
  assert _left_beside(cohort.id_map) == []


def test_a_killed_runs_parts_are_removed_by_the_next_run_of_the_map(
  cohort, tmp_path, capsys
):
  with _held_run(tmp_path, cohort.args()) as (first, _):
    left = _left_beside(cohort.id_map)
    first.kill()
    first.communicate(timeout=60)
  assert left == _left_beside(cohort.id_map)  # a parts folder and the lock
  assert [p for p in left if '.parts-' in p] and keys.lock_path(cohort.id_map) in left
  assert _main(cohort.args()) == cli.EXIT_OK
  err = capsys.readouterr().err
  parts = next(p for p in left if '.parts-' in p)
  assert f'removing {parts}: left by a run of this --id-map' in err
  assert 'taking over the lock of' in err
  assert _left_beside(cohort.id_map) == []
  assert _map_ids(cohort.id_map) == {'SCD0000101', 'SCD0000102'}


def _auth_args(cohort, auth):
  return [
    '--input',
    cohort.root,
    '--output',
    cohort.out,
    '--dicomweb-url',
    'http://127.0.0.1:9/dicom-web',
    '--dicomweb-auth-file',
    auth,
  ]


_SHARED = 'may be read or written by its group or by every user (mode %o): chmod 600 it'


@pytest.mark.parametrize(
  'case, said',
  [
    ('world-writable', _SHARED % 0o602),
    ('world-readable', _SHARED % 0o644),
    ('group-readable', _SHARED % 0o640),
    ('group-writable', _SHARED % 0o620),
    ('group read-write', _SHARED % 0o660),
    ('symlink', 'is a symbolic link: name the file itself'),
    ('fifo', 'is not a regular file (a FIFO)'),
  ],
)
@pytest.mark.parametrize('flag', ['--dicomweb-auth-file', '--pseudonymize-key-file'])
def test_a_secret_others_may_write_or_a_link_or_fifo_is_refused(
  cohort, flag, case, said, tmp_path, capsys
):
  path = str(tmp_path / 'secret')
  real = str(tmp_path / 'real')
  with open(real, 'w') as f:
    f.write('{"token": "t0ken"}' if flag == '--dicomweb-auth-file' else 'k' * 40)
  os.chmod(real, 0o600)
  modes = {
    'world-writable': 0o602,
    'world-readable': 0o644,
    'group-readable': 0o640,
    'group-writable': 0o620,
    'group read-write': 0o660,
  }
  if case in modes:
    os.rename(real, path)
    os.chmod(path, modes[case])
  elif case == 'symlink':
    os.symlink(real, path)
  else:
    os.mkfifo(path, 0o600)
  if flag == '--dicomweb-auth-file':
    args = _auth_args(cohort, path)
  else:
    args = ['--input', cohort.root, '--output', cohort.out, flag, path]
  assert _main(args, seconds=60) == cli.EXIT_USAGE
  _one_error(capsys, f'{flag} {path} {said}')
  assert not os.path.exists(cohort.out)


@pytest.mark.parametrize('how', ['symlink', 'fifo', 'hard link'])
def test_a_local_store_never_writes_through_what_is_planted(tmp_path, how):
  """What the launcher and the stages write in the staging folder through
  the store (the pinned splits, the fingerprints, the duplicate plan, the
  manifests): a second line behind the private staging folder."""
  victim = tmp_path / 'victim.txt'
  victim.write_text(_VICTIM_TEXT)
  path = str(tmp_path / '_PINNED_SPLITS.json')
  if how == 'symlink':
    os.symlink(victim, path)
  elif how == 'fifo':
    os.mkfifo(path)
  else:
    os.link(victim, path)
  what = {
    'symlink': 'a symbolic link',
    'fifo': 'a FIFO',
    'hard link': 'a file with 2 links',
  }
  with pytest.raises(local_files.PlantedError, match=f'is {what[how]}, not one'):
    stores.write_bytes(path, b'{}')
  assert victim.read_text() == _VICTIM_TEXT
  dangling = str(tmp_path / 'dangling')
  os.symlink(tmp_path / 'made-by-the-store', dangling)
  assert not stores.store(dangling).create_exclusive(dangling, b'{}')
  assert not (tmp_path / 'made-by-the-store').exists()
  plain = str(tmp_path / 'plain.json')
  stores.write_bytes(plain, b'old and longer')
  stores.write_bytes(plain, b'new')
  assert open(plain, 'rb').read() == b'new'


@pytest.mark.parametrize('dangling', [False, True])
def test_a_link_as_the_sample_dir_is_refused(tmp_path, dangling, capsys):
  victim_dir = tmp_path / 'victim-dir'
  if not dangling:
    victim_dir.mkdir()
    (victim_dir / sample.MARKER_FILE).write_text('')  # it looks like a sample
    (victim_dir / 'keep.txt').write_text(_VICTIM_TEXT)
  link = str(tmp_path / 'sample')
  os.symlink(victim_dir, link)
  args = ['--sample-dir', link, '--output', str(tmp_path / 'OUT')]
  assert _main(args) == cli.EXIT_USAGE
  _one_error(capsys, f'{link} is a symbolic link; choose another --sample-dir')
  if dangling:
    assert not victim_dir.exists()
  else:
    assert sorted(os.listdir(victim_dir)) == [sample.MARKER_FILE, 'keep.txt']


@pytest.mark.parametrize('when', ['before the move', 'after the move'])
def test_a_table_folder_swapped_for_a_link_during_the_publish_is_never_written_through(
  cohort, when, monkeypatch, capsys
):
  """After the last check, before or after the files are moved in: they
  are moved between descriptors of folders none of which is reached
  through a link, and the entries are checked again before the commits."""
  slices = os.path.join(cohort.out, 'slices')
  move = stores.move_all

  def swap():
    if os.path.lexists(slices):
      os.rename(slices, os.path.join(cohort.out, 'moved-away'))
    os.symlink(cohort.victim_dir, slices)

  def swapping_move(pairs, under=None):
    if under is None:  # not the publish's move
      return move(pairs, under)
    if when == 'before the move':
      swap()
    move(pairs, under)
    if when == 'after the move':
      swap()

  monkeypatch.setattr(stores, 'move_all', swapping_move)
  assert _main(cohort.args(id_map=False)) == cli.EXIT_USAGE
  _one_error(
    capsys, f'{slices} is a symbolic link, not a folder this pipeline made; remove it'
  )
  cohort.untouched()
  # the next run publishes; the files this one moved are no dataset's yet
  os.unlink(slices)
  monkeypatch.setattr(stores, 'move_all', move)
  assert _main(cohort.args('--overwrite', id_map=False)) == cli.EXIT_OK
  assert versions.latest(cohort.out) == 0
  assert cli.command(['verify', cohort.out]) == cli.EXIT_OK


def test_a_failure_after_publishing_says_the_version_is_published(
  cohort, tmp_path, monkeypatch, capsys
):
  """The QA page refuses a link planted after the run looked (while it
  published): exit 1, and the one line says that the version is published
  and complete and where its id map is, not that nothing was."""
  qa_dir = str(tmp_path / 'QA')
  planted = os.path.join(qa_dir, qa.OVERLAYS)
  real_publish = publish.publish

  def publish_then_plant(*args, **kwargs):
    version = real_publish(*args, **kwargs)
    os.makedirs(qa_dir, exist_ok=True)
    os.symlink(cohort.victim_dir, planted)
    return version

  monkeypatch.setattr(publish, 'publish', publish_then_plant)
  assert _main(cohort.args('--qa-dir', qa_dir)) == cli.EXIT_FAILED
  line = _one_error(
    capsys,
    f'version 0 of {cohort.out} is published and complete',
    f'its id map: {cohort.id_map} ({len(keys.read_id_map(cohort.id_map))} rows;',
    f'then writing the QA page failed: PlantedError: {planted} is a symbolic link',
  )
  assert 'nothing' not in line
  cohort.untouched()
  assert versions.latest(cohort.out) == 0
  assert _map_ids(cohort.id_map) == {'SCD0000101', 'SCD0000102'}
  assert _left_beside(cohort.id_map) == []


# A run interrupted (SIGINT to itself) while it writes the QA page, its
# dataset and id map published.
_INTERRUPTED_AT_QA = """
import os, signal, sys, time
from beam_pipeline.launch import cli
from beam_pipeline.tools import qa
def interrupted(*args):
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(30)
qa.write_qa = interrupted
sys.exit(cli.main(sys.argv[1:]))
"""


def test_an_interrupt_after_publishing_says_the_version_and_its_map_are_published(
  cohort, tmp_path
):
  args = cohort.args('--qa-dir', str(tmp_path / 'QA'))
  done = subprocess.run(
    [sys.executable, '-c', _INTERRUPTED_AT_QA, *args],
    capture_output=True,
    timeout=300,
  )
  err = done.stderr.decode()
  assert done.returncode == 128 + signal.SIGINT, err[-2000:]
  assert 'Traceback' not in err
  assert 'nothing published' not in err
  assert err.rstrip().endswith(
    'interrupted (SIGINT) after the new dataset was published; it is complete'
  ), err[-2000:]
  assert (
    f'version 0 of {cohort.out} is published and complete; its id map: '
    f'{cohort.id_map} ({len(keys.read_id_map(cohort.id_map))} rows;' in err
  )
  assert versions.latest(cohort.out) == 0
  assert _map_ids(cohort.id_map) == {'SCD0000101', 'SCD0000102'}
  assert _left_beside(cohort.id_map) == []
