"""Portable execution: the job API and external SDK worker pools, as on Flink.

A job service and two SDK worker-pool processes run on 127.0.0.1, from a
folder outside the repository, with the project installed from a freshly
built wheel (not the source tree). The same job then runs through
PortableRunner and its dataset must equal the DirectRunner's.
"""

import glob
import os
import shutil
import subprocess
import sys

import pytest

from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from tests.helpers import dataset_tables, free_port, wait_for_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def services(tmp_path_factory):
  """(env, workdir, job port, [pool ports]); stops every process it started."""
  work = tmp_path_factory.mktemp('portable')
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '--no-deps',
      '-q',
      '-w',
      str(work / 'dist'),
      REPO,
    ],
    check=True,
    capture_output=True,
    timeout=600,
  )
  (wheel,) = glob.glob(str(work / 'dist' / '*.whl'))
  site = work / 'site'
  subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'install',
      '-q',
      '--no-deps',
      '--target',
      str(site),
      wheel,
    ],
    check=True,
    capture_output=True,
    timeout=600,
  )
  shutil.copy(os.path.join(REPO, 'run_pipeline.py'), work / 'run_pipeline.py')
  env = {
    **os.environ,
    'PYTHONPATH': str(site),  # the wheel, ahead of the editable install
    # The worker pools start SDK workers with the first `python` on PATH.
    'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''),
  }
  job_port, pool_ports = free_port(), [free_port(), free_port()]
  commands = [
    [
      sys.executable,
      '-m',
      'apache_beam.runners.portability.local_job_service_main',
      '--port',
      str(job_port),
    ],
    *(
      [
        sys.executable,
        '-m',
        'apache_beam.runners.worker.worker_pool_main',
        f'--service_port={port}',
      ]
      for port in pool_ports
    ),
  ]
  logs = [open(work / f'service-{n}.log', 'w') for n in range(len(commands))]
  processes = [
    subprocess.Popen(
      c, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    for c, log in zip(commands, logs, strict=True)
  ]
  try:
    for port, process in zip([job_port, *pool_ports], processes, strict=True):
      wait_for_port(port, process, process.args[0])
    yield env, work, job_port, pool_ports
  finally:
    for process in processes:
      if process.poll() is None:
        os.killpg(process.pid, 15)
    for process in processes:
      try:
        process.wait(timeout=20)
      except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
    for log in logs:
      log.close()


@pytest.mark.parametrize('pool, extra', [(0, []), (1, ['--labeled-only'])])
def test_portable_runner_gives_the_direct_runners_dataset(
  services, tmp_path, pool, extra
):
  env, work, job_port, pool_ports = services
  root = str(tmp_path / 'DATA')
  sample.make_tree(root, patients=3, slices=8, rows=24, columns=24, quirks=['all'])
  direct = str(tmp_path / 'direct')
  assert cli.main(['--input', root, '--output', direct, *extra]) == 3
  portable = str(tmp_path / 'portable')
  done = subprocess.run(
    [
      sys.executable,
      str(work / 'run_pipeline.py'),
      '--input',
      root,
      '--output',
      portable,
      '--runner',
      'PortableRunner',
      f'--job_endpoint=localhost:{job_port}',
      '--environment_type=EXTERNAL',
      f'--environment_config=localhost:{pool_ports[pool]}',
      *extra,
    ],
    cwd=work,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 3, done.stderr[-3000:]
  assert 'Summary' in done.stdout
  assert dataset_tables(portable) == dataset_tables(direct)
