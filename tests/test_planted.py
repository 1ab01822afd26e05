"""Files planted where the pipeline writes (issue 35, defect 1): a symbolic
link, a FIFO or a hard link as OUT/_LOCK is refused, and nothing it leads
to is touched."""

import os
import threading

import pytest

from beam_pipeline.launch import cli, lock
from beam_pipeline.tools import sample


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
