"""The command line, run as a user runs it: the real entry point in a
subprocess, its exit code, its output and the files it leaves."""

import ctypes
import fcntl
import os
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import termios

import pyarrow.parquet as pq
import pytest

from beam_pipeline.dataset import history
from beam_pipeline.launch import arguments, cli, console, preflight
from beam_pipeline.tools import sample
from tests.helpers import dataset_tables
from transforms import settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import sys
from beam_pipeline.launch import cli
code = cli.main(['--help'])
heavy = sorted(m for m in ('apache_beam', 'pydicom', 'pyarrow') if m in sys.modules)
print('exit', code, 'heavy', heavy)
"""


def test_help_lists_every_option_without_importing_beam_pydicom_or_pyarrow():
  done = subprocess.run(
    [sys.executable, '-c', _PROBE], cwd=REPO, capture_output=True, text=True, timeout=60
  )
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip().endswith('exit 0 heavy []'), done.stdout[-500:]
  for action in arguments.help_parser()._actions:
    for flag in action.option_strings:
      assert flag in done.stdout, flag
  assert '--runner' in done.stdout  # where Beam's own options are described


def test_run_pipeline_help_exits_zero():
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, 'run_pipeline.py'), '--help'],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert done.returncode == 0 and '--labeled-only' in done.stdout, done.stderr


def _cli(tmp_path, *args, env=None, preexec_fn=None):
  """The real entry point, run in ``tmp_path``: (exit code, stdout, stderr)."""
  done = subprocess.run(
    [sys.executable, os.path.join(REPO, 'run_pipeline.py'), *args],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
    preexec_fn=preexec_fn,
  )
  return done.returncode, done.stdout, done.stderr


# A console line of ours: a log line of the project's loggers, or the summary.
_OURS = re.compile(
  r'^\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) (beam_pipeline|transforms|worker)[.:]'
)


@pytest.mark.parametrize(
  'args, expected',
  [
    (
      ['--labelled-only'],
      'unknown option --labelled-only; did you mean --labeled-only?',
    ),
    (['--ouput', 'X'], 'unknown option --ouput; did you mean --output?'),
    (['--labeled_only'], 'unknown option --labeled_only; did you mean --labeled-only?'),
    (
      ['--direct_num_worker=2'],
      'unknown option --direct_num_worker; did you mean --direct_num_workers?',
    ),
    (['--chunk-size', 'many'], "argument --chunk-size: invalid int value: 'many'"),
    (['--image-codec', 'jpeg'], "argument --image-codec: unknown codec 'jpeg' (choose"),
    (['--image-codec', 'zstd:0'], 'zstd takes a level from 1 to 22'),
    (['--image-codec', 'lz4:3'], 'argument --image-codec: lz4 takes no level'),
    (['stray'], "unexpected argument 'stray'"),
    (['--input', '/tmp/\udcffDATA'], '--input /tmp/\\xffDATA is not valid UTF-8'),
  ],
)
def test_a_mistyped_option_is_one_line_and_exit_two_before_anything_runs(
  tmp_path, args, expected
):
  code, out, err = _cli(tmp_path, '--output', str(tmp_path / 'OUT'), *args)
  assert code == cli.EXIT_USAGE
  assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  assert expected in err
  assert os.listdir(tmp_path) == []  # no sample generated, no output made


def test_help_beam_lists_beams_options_and_ours(tmp_path):
  code, out, _ = _cli(tmp_path, '--help-beam')
  assert code == 0
  for flag in ('--runner', '--direct_num_workers', '--s3_endpoint_url', '--chunk-size'):
    assert flag in out, flag


def test_the_quick_start_runs_twice_and_leaves_nothing_behind(tmp_path):
  """The README's first command, twice: the built-in sample's own output is
  replaced; nothing is left in the temp folder; the console holds only our
  lines (Beam's notes and import-time warnings go to the log file)."""
  work, temp = tmp_path / 'work', tmp_path / 'tmp'
  work.mkdir()
  temp.mkdir()
  env = {**os.environ, 'TMPDIR': str(temp)}
  env.pop(console.LOG_DIR_VARIABLE, None)
  for _ in range(2):
    code, out, err = _cli(work, env=env)
    assert code == cli.EXIT_OK, err
    assert 'Summary' in out
    assert all(_OURS.match(line) for line in err.splitlines()), err
    # the sample's 3 patients fill every split: no empty-split warning
    assert 'is empty' not in out + err, (out, err)
  assert sorted(os.listdir(work)) == ['output', 'sample_data']
  logs_dir = temp / f'cardiac-mri-logs-{os.getuid()}'
  assert os.listdir(temp) == [logs_dir.name]  # no beam-temp* folder
  assert os.stat(logs_dir).st_mode & 0o777 == 0o700
  logs = sorted(os.listdir(logs_dir))
  assert len(logs) == 2
  assert all(os.stat(logs_dir / log).st_mode & 0o777 == 0o600 for log in logs)
  logged = (logs_dir / logs[0]).read_text()
  assert 'apache_beam' in logged and 'publishing version 0 (' in logged


def test_an_output_made_from_another_input_needs_overwrite(tmp_path):
  assert _cli(tmp_path)[0] == cli.EXIT_OK  # the sample and its output
  assert _cli(tmp_path)[0] == cli.EXIT_OK  # the same input again: version 1
  other = str(tmp_path / 'other')
  sample.make_tree(other, patients=1, slices=3, rows=16, columns=16)
  code, _, err = _cli(tmp_path, '--input', other)
  (line,) = err.splitlines()
  assert code == cli.EXIT_USAGE
  assert 'holds versions made from' in line and '--overwrite' in line
  assert [v['version'] for v in history(str(tmp_path / 'output'))] == [0, 1]
  assert _cli(tmp_path, '--input', other, '--overwrite')[0] == cli.EXIT_OK
  found = history(str(tmp_path / 'output'))
  assert [v['input'] for v in found][-1] == other and len(found) == 3


_NOISE = """
import logging, sys
from beam_pipeline.launch import console
path = console.configure_logging(sys.argv[1])
logging.warning('apitools not found, and bigquery client libraries are missing')
logging.getLogger('apache_beam.runners').info('Running stage 12')
logging.getLogger('beam_pipeline.launch.run').info('reading DATA')
try:
  1 / 0
except ZeroDivisionError:
  log = logging.getLogger('beam_pipeline.launch.cli')
  log.error('the pipeline failed', exc_info=True)
"""


def test_the_console_shows_our_lines_and_the_log_file_keeps_everything(tmp_path):
  log = tmp_path / 'run.log'
  done = subprocess.run(
    [sys.executable, '-c', _NOISE, str(log)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert done.returncode == 0, done.stderr
  (line,) = done.stderr.splitlines()
  assert line.endswith('INFO beam_pipeline.launch.run: reading DATA')
  kept = log.read_text()
  for text in ('apitools not found', 'Running stage 12', 'reading DATA'):
    assert text in kept
  assert 'Traceback' in kept and 'ZeroDivisionError' in kept


@pytest.mark.parametrize(
  'output, expected',
  [
    ('a_file', 'is a file, not a folder'),
    ('a_file/OUT', 'a_file is a file, not a folder'),
    ('/proc/cardiac-mri/OUT', 'is not writable: No such file or directory'),
  ],
)
def test_an_output_that_cannot_be_a_folder_is_refused_before_anything_runs(
  tmp_path, output, expected
):
  sample.make_tree(str(tmp_path / 'DATA'), patients=1, slices=2, rows=8, columns=8)
  (tmp_path / 'a_file').write_text('kept')
  code, out, err = _cli(tmp_path, '--input', 'DATA', '--output', output)
  assert code == cli.EXIT_USAGE, err
  (line,) = err.splitlines()
  assert line.startswith('error: --output ') and expected in line, line
  assert (tmp_path / 'a_file').read_text() == 'kept'
  assert sorted(os.listdir(tmp_path)) == ['DATA', 'a_file']


def _without_root_powers():
  """For a child of root: drops the capabilities that let root write into a
  folder without write permission (the bounding set, so they are gone after
  exec), so the permission bits count as they would for a user."""
  if os.geteuid() != 0:
    return
  libc = ctypes.CDLL(None, use_errno=True)
  for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
      raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')


def test_an_output_without_write_permission_is_refused_before_anything_runs(tmp_path):
  sample.make_tree(str(tmp_path / 'DATA'), patients=1, slices=2, rows=8, columns=8)
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o555)
  try:
    for output in ('locked', 'locked/OUT'):
      code, _, err = _cli(
        tmp_path, '--input', 'DATA', '--output', output, preexec_fn=_without_root_powers
      )
      assert code == cli.EXIT_USAGE, err
      (line,) = err.splitlines()
      assert 'is not writable: Permission denied' in line, line
    assert os.listdir(locked) == []
  finally:
    locked.chmod(0o755)


def test_a_dataset_larger_than_the_free_space_is_refused_unless_told(tmp_path):
  """The estimate is checked against the real free space: one 4096 x 4096
  slice, hard-linked until the dataset would not fit, while the files
  themselves take one slice's room."""
  root = tmp_path / 'DATA'
  sample.make_tree(str(root), patients=1, slices=1, rows=4096, columns=4096)
  raw = preflight.survey(str(root))
  assert raw.bytes_per_slice > 4096 * 4096 * 2  # the image, masks and the rest
  found = preflight.survey(str(root), settings.DEFAULT_IMAGE_CODEC)
  assert found.bytes_per_slice < raw.bytes_per_slice  # the phantom compresses
  free = preflight.shutil.disk_usage(tmp_path).free
  # a fifth more than the free space: other processes may free some meanwhile
  copies = free * 6 // 5 // found.bytes_per_slice + 2
  assert copies < 200_000, f'{free} bytes free: too many links to make'
  folder = root / 'dicoms' / os.listdir(root / 'dicoms')[0]
  for n in range(2, copies + 1):
    os.link(folder / '1.dcm', folder / f'{n}.dcm')
  code, _, err = _cli(tmp_path, '--input', 'DATA', '--output', 'OUT')
  assert code == cli.EXIT_USAGE, err
  (line,) = err.splitlines()
  assert 'the dataset needs about' in line and '--skip-space-check' in line, line
  assert not (tmp_path / 'OUT').exists()
  code, _, err = _cli(
    tmp_path, '--input', 'DATA', '--output', 'OUT', '--skip-space-check', '--help'
  )
  assert code == cli.EXIT_OK  # the option exists (a real run would fill the disk)


def test_a_write_failing_mid_run_names_the_file_and_keeps_the_previous_dataset(
  tmp_path,
):
  """A file size limit (RLIMIT_FSIZE, as a full disk does) makes the slice
  shards fail to write while the run is under way."""
  sample.make_tree(str(tmp_path / 'DATA'), patients=2, slices=24, rows=256, columns=256)
  code, _, err = _cli(tmp_path, '--input', 'DATA', '--output', 'OUT')
  assert code == cli.EXIT_OK, err
  before = dataset_tables(str(tmp_path / 'OUT'))

  def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

  code, _, err = _cli(
    tmp_path,
    '--input',
    'DATA',
    '--output',
    'OUT',
    '--full',  # every slice written again (incremental: none would be)
    preexec_fn=limit_file_size,
  )
  assert code == cli.EXIT_FAILED
  line = err.splitlines()[-1]
  assert line.startswith('error: the pipeline failed: OSError: [Errno 27]'), err
  assert str(tmp_path / 'OUT' / '_incomplete') in line and 'full traceback in' in line
  assert 'Traceback' not in err
  assert dataset_tables(str(tmp_path / 'OUT')) == before


def test_the_first_log_line_names_the_runner_mode_and_explicit_options_win(tmp_path):
  sample.make_tree(str(tmp_path / 'DATA'), patients=1, slices=3, rows=8, columns=8)
  code, _, err = _cli(tmp_path, '--input', 'DATA', '--output', 'A')
  assert code == cli.EXIT_OK, err
  first = err.splitlines()[0]
  assert 'runner DirectRunner, in-process (3 slices < ' in first, first
  code, _, err = _cli(
    tmp_path,
    '--input',
    'DATA',
    '--output',
    'B',
    '--direct_running_mode=multi_processing',
    '--direct_num_workers=2',
  )
  assert code == cli.EXIT_OK, err
  first = err.splitlines()[0]
  assert 'runner DirectRunner, multi_processing x2 (as given)' in first, first
  assert dataset_tables(str(tmp_path / 'A')) == dataset_tables(str(tmp_path / 'B'))


def _on_a_terminal(tmp_path, *args) -> tuple[int, str]:
  """The entry point with stderr on a pseudo-terminal of 120 x 40: (exit
  code, what the terminal received)."""
  master, child = pty.openpty()
  fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))
  process = subprocess.Popen(
    [sys.executable, os.path.join(REPO, 'run_pipeline.py'), *args],
    cwd=tmp_path,
    stdout=subprocess.DEVNULL,
    stderr=child,
  )
  os.close(child)
  received = []
  while True:
    try:
      data = os.read(master, 65536)
    except OSError:  # EIO: the child closed the terminal
      break
    if not data:
      break
    received.append(data)
  os.close(master)
  return process.wait(timeout=300), b''.join(received).decode('utf-8', 'replace')


def test_progress_is_a_live_bar_on_a_terminal_and_lines_with_totals_otherwise(
  tmp_path,
):
  manifest = sample.make_tree(
    str(tmp_path / 'DATA'), patients=3, slices=40, rows=64, columns=64
  )
  total = len(manifest.slices)
  code, shown = _on_a_terminal(tmp_path, '--input', 'DATA', '--output', 'A')
  assert code == cli.EXIT_OK, shown
  assert '\r' in shown and f'{total}/{total} [' in shown, shown  # tqdm's bar
  assert '100%|' in shown and 'slices/s' in shown and '3 patients done' in shown
  assert 'beam_pipeline.launch.progress' not in shown  # the bar replaces the lines
  first = shown.splitlines()[0]
  assert 'INFO beam_pipeline.launch.run: reading ' in first  # log lines stay whole
  code, _, err = _cli(tmp_path, '--input', 'DATA', '--output', 'B')
  assert code == cli.EXIT_OK, err
  lines = [x for x in err.splitlines() if 'INFO beam_pipeline.launch.progress: ' in x]
  assert f'progress: {total}/{total} slices (100%), ' in lines[-1], err
  assert '\r' not in err


def _command():
  """The installed console command (setup.py's entry point)."""
  found = shutil.which('cardiac-mri') or os.path.join(
    os.path.dirname(sys.executable), 'cardiac-mri'
  )
  if not os.path.exists(found):
    if os.environ.get('CI'):
      pytest.fail('cardiac-mri is not installed; requirements*.txt install it (-e .)')
    pytest.skip('cardiac-mri is not installed: pip install -e .')
  return found


def _cardiac_mri(tmp_path, *args):
  done = subprocess.run(
    [_command(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  return done.returncode, done.stdout, done.stderr


def test_the_console_command_lists_its_commands_and_refuses_unknown_ones(tmp_path):
  code, out, err = _cardiac_mri(tmp_path)
  assert code == cli.EXIT_USAGE and 'usage: cardiac-mri COMMAND' in err
  code, out, _ = _cardiac_mri(tmp_path, '--help')
  assert code == cli.EXIT_OK
  for name in ('run', 'inspect', 'qa', 'verify', 'sample', 'problems', 'keygen'):
    assert f'\n  {name} ' in out, name
  code, _, err = _cardiac_mri(tmp_path, 'inspekt')
  assert code == cli.EXIT_USAGE
  (line,) = err.splitlines()
  assert line.startswith("error: unknown command 'inspekt'; did you mean inspect?")
  code, out, _ = _cardiac_mri(tmp_path, 'run', '--help')
  assert code == cli.EXIT_OK and out.startswith('usage: cardiac-mri run ')
  code, _, err = _cardiac_mri(tmp_path, 'run', '--labelled-only')
  assert code == cli.EXIT_USAGE and 'did you mean --labeled-only?' in err
  assert os.listdir(tmp_path) == []


def test_every_tool_runs_through_the_console_command(tmp_path):
  code, out, err = _cardiac_mri(
    tmp_path, 'sample', 'DATA', '--patients', '2', '--slices', '6'
  )
  assert code == 0 and 'DATA: 12 slices' in out, err
  code, _, err = _cardiac_mri(tmp_path, 'sample', 'DATA')
  assert code == cli.EXIT_USAGE and err.strip() == 'error: DATA is not empty'
  code, out, err = _cardiac_mri(tmp_path, 'run', '--input', 'DATA', '--output', 'OUT')
  assert code == cli.EXIT_OK and 'Summary' in out, err
  table = pq.read_table(
    tmp_path / 'OUT' / 'slices', columns=['patient_id', 'original_id', 'slice_index']
  ).to_pylist()
  first = min(table, key=lambda r: (r['patient_id'], r['slice_index']))
  # inspect takes the original_id (the contour folder's name) too
  code, out, err = _cardiac_mri(
    tmp_path,
    'inspect',
    'OUT',
    '--patient',
    first['original_id'],
    '--slice',
    str(first['slice_index']),
  )
  png = tmp_path / f'{first["patient_id"]}-{first["slice_index"]}.png'
  assert code == 0 and png.exists(), err
  code, _, err = _cardiac_mri(
    tmp_path, 'inspect', 'OUT', '--patient', 'P9', '--slice', '1'
  )
  assert code == cli.EXIT_USAGE
  for r in table:
    assert f'{r["patient_id"]} ({r["original_id"]})' in err
  code, out, err = _cardiac_mri(tmp_path, 'verify', 'OUT')
  assert code == 0 and 'checks passed' in out, out + err
  code, out, _ = _cardiac_mri(tmp_path, 'problems', 'OUT')
  assert code == 0 and '0 problem rows' in out
  # A reader that stops early (| head) ends the tool quietly.
  piped = subprocess.Popen(
    [_command(), 'problems', 'OUT'],
    cwd=tmp_path,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
  )
  piped.stdout.close()
  assert piped.wait(timeout=60) == 0
  assert b'Traceback' not in piped.stderr.read()
  code, out, err = _cardiac_mri(tmp_path, 'qa', 'OUT', 'QA')
  assert code == 0 and (tmp_path / 'QA' / 'index.html').exists(), err


def test_above_the_crossover_the_run_uses_one_worker_process_per_core(tmp_path):
  """A tree one slice above this machine's crossover (hard links of one small
  slice, so all copies of one image) runs with worker processes, chosen by
  the pipeline; one core stays in-process."""
  root = tmp_path / 'DATA'
  sample.make_tree(str(root), patients=1, slices=1, rows=8, columns=8, contour_every=1)
  cores = preflight.cores()
  workers = min(cores, preflight.MAX_WORKERS)
  slices = int(preflight.crossover(workers)) + 1 if workers > 1 else 50
  assert slices < 40_000
  folder = root / 'dicoms' / os.listdir(root / 'dicoms')[0]
  for n in range(2, slices + 1):
    os.link(folder / '1.dcm', folder / f'{n}.dcm')
  code, out, err = _cli(tmp_path, '--input', 'DATA', '--output', 'OUT')
  # Every slice is a copy of one file: one duplicate_slice row, all written
  # and flagged, nothing dropped.
  assert code == cli.EXIT_OK, err
  assert 'reconciliation     duplicate_slice: 1\n' in out
  first = err.splitlines()[0]
  if workers > 1:
    assert (
      f'runner DirectRunner, {workers} worker processes ({slices:,} slices >= ' in first
    )
  else:
    assert 'runner DirectRunner, in-process (' in first and ', 1 core)' in first
  assert f'slices written     {slices}' in out
