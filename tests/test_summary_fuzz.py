"""Every tool and reader on a run record that is self-consistent but not as
the pipeline writes it, and on a closed stdout.

The run record (what ``_SUMMARY.json`` held before schema 3: the slices
commit's ``cardiac_mri`` entry) is edited, its own digest made again so that
only its shape is wrong: any key dropped, any value replaced by one of
another JSON type, at any depth, the record itself included. ``problems``,
``verify``, ``history``, ``inspect``, ``qa`` and ``export`` then end with
their documented exit code, and a refusal is one ``error:`` line on stderr;
``iter_batches``, ``shuffled_rows`` and ``SliceDataset`` read the dataset or
raise ``DatasetError``, never a TypeError or KeyError.

A closed pipe (``cardiac-mri problems OUT | head -1``) stops a command's
output, never with a traceback, and the command exits with the code it
would have had.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from beam_pipeline import dataset
from beam_pipeline.dataset import versions
from beam_pipeline.launch import cli
from beam_pipeline.tools import export, history, overlay, problems, qa, sample, verify
from transforms.contract import digests, schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRAYS = 160  # problem rows enough to overflow a pipe and stdout's buffer


@pytest.fixture(scope='module')
def written(tmp_path_factory):
  """A small output whose problems fill more than 16 KB of lines:
  (output, the slices commit's path, its bytes, a patient_id)."""
  folder = tmp_path_factory.mktemp('fuzz')
  root, out = str(folder / 'DATA'), str(folder / 'OUT')
  manifest = sample.make_tree(root, patients=2, slices=3, rows=16, columns=16)
  patient = sorted({s.patient_id for s in manifest.slices.values()})[0]
  for n in range(STRAYS):
    with open(os.path.join(root, 'dicoms', patient, f'notes-{n:03d}.txt'), 'w') as f:
      f.write('not a slice')
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_DROPPED
  commit = versions.log_path(out, schema.SLICES_DIR, versions.latest(out))
  with open(commit, 'rb') as f:
    original = f.read()
  return out, commit, original, patient


def _record_paths(value, path=()):
  """Every place in a JSON value: () for the value itself."""
  yield path
  if isinstance(value, dict):
    for key, item in value.items():
      yield from _record_paths(item, (*path, key))
  elif isinstance(value, list):
    for k, item in enumerate(value):
      yield from _record_paths(item, (*path, k))


_JSON = st.recursive(
  st.none()
  | st.booleans()
  | st.integers(-(2**70), 2**70)
  | st.floats(allow_nan=False)
  | st.text(max_size=6),
  lambda inner: (
    st.lists(inner, max_size=2)
    | st.dictionaries(st.text(max_size=4), inner, max_size=2)
  ),
  max_leaves=4,
)


def _kind(value) -> str:
  return 'int' if type(value) is int else type(value).__name__


def _record(original: bytes) -> tuple[list[dict], int]:
  """The commit's actions and the index of the one holding the record."""
  actions = [json.loads(line) for line in original.splitlines() if line.strip()]
  at = next(k for k, a in enumerate(actions) if 'commitInfo' in a)
  return actions, at


def _mutated(original: bytes, path: tuple, replacement, drop: bool) -> bytes:
  """The commit with the record's value at ``path`` dropped or replaced,
  and the record's digest made again (unless the digest is what changed)."""
  actions, at = _record(original)
  info = actions[at]['commitInfo']
  holder, key = info, versions.RECORD_KEY
  for part in path:
    holder, key = holder[key], part
  if drop:
    del holder[key]
  else:
    holder[key] = replacement
  record = info.get(versions.RECORD_KEY)
  if isinstance(record, dict) and path != (digests.SUMMARY_DIGEST,):
    record[digests.SUMMARY_DIGEST] = digests.of_summary(record)
  return b'\n'.join(json.dumps(a).encode() for a in actions) + b'\n'


def _tool(main, argv) -> tuple[int, str, str]:
  """(exit code, stdout, stderr) of a tool's main, in this process."""
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = main(argv)
  return code, stdout.getvalue(), stderr.getvalue()


def _check_tools(out: str, patient: str, scratch: str) -> None:
  """Each tool ends with a documented code; a refusal is one line."""
  png = os.path.join(scratch, 'slice.png')
  runs = {
    'problems': (problems.main, [out], {0, 1, 2}),
    'verify': (verify.main, [out], {0, 1, 2}),
    'history': (history.main, [out], {0, 2}),
    'history --json': (history.main, [out, '--json'], {0, 2}),
    'inspect': (
      overlay.main,
      [out, '--patient', patient, '--slice', '1', '-o', png],
      {0, 2},
    ),
    'qa': (qa.main, [out, os.path.join(scratch, 'qa')], {0, 2}),
    'export': (
      export.main,
      [out, os.path.join(scratch, 'export'), '--overwrite'],
      {0, 2, 3},
    ),
  }
  for name, (main, argv, codes) in runs.items():
    code, _, err = _tool(main, argv)
    assert code in codes, (name, code, err)
    if code == 2:
      lines = err.strip().splitlines()
      assert len(lines) == 1 and lines[0].startswith('error: '), (name, err)
    assert 'Traceback' not in err, name


def _check_readers(out: str) -> None:
  """Each reader reads the dataset or raises DatasetError."""
  from beam_pipeline.dataset.torch_data import SliceDataset

  readers = {
    'iter_batches': lambda: sum(
      len(b['patient_id']) for b in dataset.iter_batches(out, 4)
    ),
    'shuffled_rows': lambda: len(list(dataset.shuffled_rows(out, seed=1))),
    'SliceDataset': lambda: SliceDataset(out, seed=0) and 0,
  }
  for name, read in readers.items():
    try:
      read()
    except dataset.DatasetError:
      pass
    except Exception as e:  # noqa: BLE001 - the finding: an undocumented error
      pytest.fail(f'{name} raised {type(e).__name__}: {e}')


@st.composite
def _edits(draw, original: bytes):
  actions, at = _record(original)
  record = actions[at]['commitInfo'][versions.RECORD_KEY]
  path = draw(st.sampled_from(sorted(_record_paths(record), key=repr)))
  value = record
  for part in path:
    value = value[part]
  drop = bool(path) and draw(st.booleans())
  replacement = draw(_JSON.filter(lambda v: _kind(v) != _kind(value)))
  return path, replacement, drop


def _fuzz_settings():
  return settings(
    max_examples=int(os.environ.get('FUZZ_EXAMPLES', '30')),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
  )


def test_a_malformed_run_record_is_one_line_or_a_dataset_error(written, tmp_path):
  out, commit, original, patient = written
  edits = _edits(original)

  @_fuzz_settings()
  @given(edits)
  @example(((), ['a list where the record belongs'], False))
  @example((('files',), ['slices/x.parquet'], False))
  @example((('counters',), None, True))
  @example((('tables',), 'errors', False))
  @example((('counters', 'slices_written'), '6', False))
  @example((('input',), {'a': 1}, False))
  @example((('dropped_duplicates',), [['x']], False))
  def check(edit):
    path, replacement, drop = edit
    with open(commit, 'wb') as f:
      f.write(_mutated(original, path, copy.deepcopy(replacement), drop))
    scratch = tmp_path / 'scratch'
    scratch.mkdir(exist_ok=True)
    try:
      _check_tools(out, patient, str(scratch))
      _check_readers(out)
    finally:
      with open(commit, 'wb') as f:
        f.write(original)
      shutil.rmtree(scratch, ignore_errors=True)

  check()
  # the examples did change the record: the untouched one still reads
  assert dataset.check(out)[versions.VERSION] == 0


def test_the_commit_itself_malformed_is_a_dataset_error(written):
  """The commit's own structure (what deltalake writes around the record)."""
  out, commit, original, _ = written
  actions, at = _record(original)
  changed = []
  for edit in ('info is a list', 'add without path', 'timestamp is text'):
    broken = copy.deepcopy(actions)
    if edit == 'info is a list':
      broken[at]['commitInfo'] = [broken[at]['commitInfo']]
    elif edit == 'add without path':
      added = next(a for a in broken if 'add' in a)
      added['add'] = ['no path']
    else:
      broken[at]['commitInfo']['timestamp'] = 'yesterday'
    changed.append((edit, b'\n'.join(json.dumps(a).encode() for a in broken)))
  try:
    for edit, data in changed:
      with open(commit, 'wb') as f:
        f.write(data)
      if edit == 'timestamp is text':  # the record is intact: history says so
        code, text, _ = _tool(history.main, [out, '--json'])
        assert code == 0 and json.loads(text)[0]['committed'] is None
        continue
      with pytest.raises(dataset.DatasetError, match='is unreadable'):
        dataset.check(out)
      code, _, err = _tool(problems.main, [out])
      assert code == 2 and err.count('\n') == 1, (edit, err)
      # history reads the records only: a broken add action is not its concern
      code, _, err = _tool(history.main, [out])
      assert code == (2 if edit == 'info is a list' else 0), (edit, err)
      assert 'Traceback' not in err
  finally:
    with open(commit, 'wb') as f:
      f.write(original)


# -- a closed stdout ---------------------------------------------------------


def _start(argv: list[str], cwd: str, unbuffered: bool, read_first: bool = False):
  """Starts ``argv`` with stdout into a pipe whose reader closes it: at once,
  or (``read_first``) after its first line, the pipe shrunk to one page so
  that the command is still writing then (see :func:`_finish`).
  ``unbuffered``: every print reaches the pipe at once (PYTHONUNBUFFERED)."""
  reader, writer = os.pipe()
  if read_first:
    fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)
  else:
    os.close(reader)
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.pop('PYTHONUNBUFFERED', None)
  if unbuffered:
    env['PYTHONUNBUFFERED'] = '1'
  child = subprocess.Popen(
    argv, stdout=writer, stderr=subprocess.PIPE, cwd=cwd, env=env
  )
  os.close(writer)
  return child, reader if read_first else None


def _finish(child: subprocess.Popen, reader: int | None) -> tuple[int, str]:
  """(exit code, stderr) of a command started by :func:`_start`."""
  if reader is not None:
    first = b''
    while b'\n' not in first:
      chunk = os.read(reader, 64)
      assert chunk, 'no line before the end'
      first += chunk
    os.close(reader)
  _, err = child.communicate(timeout=300)
  return child.returncode, err.decode()


def _command(*args: str) -> list[str]:
  return [os.path.join(os.path.dirname(sys.executable), 'cardiac-mri'), *args]


@pytest.mark.parametrize('unbuffered', [False, True], ids=['buffered', 'unbuffered'])
def test_problems_into_head_ends_quietly_with_its_exit_code(
  written, tmp_path, unbuffered
):
  """``problems OUT | head -1``, as the console command and as a module:
  the problem rows overflow the pipe, the reader leaves after one line."""
  out = written[0]
  for argv in (
    _command('problems', out),
    [sys.executable, '-m', 'beam_pipeline.tools.problems', out],
  ):
    code, err = _finish(*_start(argv, str(tmp_path), unbuffered, read_first=True))
    assert 'Traceback' not in err and 'Exception ignored' not in err, err
    assert err == '' and code == 1, (argv, code, err)  # 1: there are problem rows


def test_every_command_with_a_closed_stdout_keeps_its_exit_code(written, tmp_path):
  """Every print of each command meets a closed pipe (unbuffered): the
  command does its work and exits with its own code, nothing on stderr but
  its own one-line refusal."""
  out, _, _, patient = written
  scratch = str(tmp_path)
  data = os.path.join(os.path.dirname(out), 'DATA')
  expected = {
    ('run', '--input', data, '--output', os.path.join(scratch, 'OUT')): 3,
    ('problems', out): 1,
    ('verify', out): 0,
    ('history', out): 0,
    ('history', out, '--json'): 0,
    ('inspect', out, '--patient', patient, '--slice', '1'): 0,
    ('qa', out, os.path.join(scratch, 'qa')): 0,
    ('export', out, os.path.join(scratch, 'nnunet')): 0,
    ('vacuum', out, '--dry-run'): 0,
    ('sample', os.path.join(scratch, 'tree'), '--patients', '1', '--slices', '2'): 0,
    ('--help',): 0,
    ('run', '--help'): 0,
    ('run', '--help-beam'): 0,
    ('problems', '--help'): 0,
    ('problems', os.path.join(scratch, 'nothing')): 2,
    ('keygen', os.path.join(scratch, 'key')): 0,
  }
  found = {}
  pending = list(expected)
  while pending:  # three at a time: the machine has two cores
    batch, pending = pending[:3], pending[3:]
    started = {
      args: _start(_command(*args), scratch, unbuffered=True) for args in batch
    }
    found.update({args: _finish(*child) for args, child in started.items()})
  for args, (code, err) in found.items():
    assert 'Traceback' not in err and 'Exception ignored' not in err, (args, err)
    assert code == expected[args], (args, code, err)
    if code == 2:
      assert err.startswith('error: ') and err.count('\n') == 1, (args, err)
  for made in ('qa/index.html', 'key', 'OUT/slices', 'tree/link.csv'):
    assert os.path.exists(os.path.join(scratch, made)), made


@pytest.mark.parametrize('unbuffered', [False, True], ids=['buffered', 'unbuffered'])
@pytest.mark.parametrize('form', ['cardiac-mri keygen', 'python -m'])
def test_keygen_with_a_closed_stdout_writes_its_key_and_exits_zero(
  tmp_path, form, unbuffered
):
  """The key is written (mode 600) and the command says so on a stdout
  whose reader has gone: exit 0, nothing on stderr (was: exit 1 unbuffered,
  a BrokenPipeError traceback as a module)."""
  key = str(tmp_path / 'key')
  if form == 'python -m':
    argv = [sys.executable, '-m', 'beam_pipeline.tools.keys', key]
  else:
    argv = _command('keygen', key)
  code, err = _finish(*_start(argv, str(tmp_path), unbuffered))
  assert (code, err) == (0, '')
  assert os.stat(key).st_mode & 0o777 == 0o600 and os.path.getsize(key) == 32
