"""DirectFile: O_DIRECT writes (or buffered where refused) give exact files."""

import errno
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from transforms.io import direct
from transforms.io.direct import ALIGNMENT, DirectFile

BUFFER = 2 * ALIGNMENT


def _pieces(seed: int) -> list[bytes]:
  """Sizes around every boundary: empty, one byte, a block, a buffer, several."""
  rng = np.random.default_rng(seed)
  sizes = [0, 1, ALIGNMENT - 1, ALIGNMENT, 1, BUFFER, BUFFER + 1, 3 * BUFFER + 7]
  sizes += [int(n) for n in rng.integers(0, 3 * BUFFER, 40)]
  return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize('unbuffered', [True, False], ids=['direct', 'buffered'])
@pytest.mark.parametrize('tail', [0, 1, ALIGNMENT - 1], ids=lambda n: f'tail{n}')
def test_the_file_holds_exactly_what_was_written(tmp_path, unbuffered, tail):
  pieces = _pieces(tail) + [b'x' * tail]
  path = str(tmp_path / 'sub' / 'f.bin')
  with DirectFile(path, buffer_size=BUFFER, direct=unbuffered) as f:
    for piece in pieces:
      assert f.write(piece) == len(piece)
    assert f.tell() == sum(map(len, pieces))
  assert open(path, 'rb').read() == b''.join(pieces)


def test_takes_any_buffer_and_writes_parquet(tmp_path):
  path = str(tmp_path / 'f.bin')
  array = np.arange(5000, dtype=np.int16)
  with DirectFile(path, buffer_size=BUFFER) as f:
    f.write(bytearray(b'ab'))
    f.write(memoryview(b'cd'))
    f.write(pa.py_buffer(b'ef'))
    f.write(array)
  assert open(path, 'rb').read() == b'abcdef' + array.tobytes()

  table = pa.table({'image': [os.urandom(100_000) for _ in range(30)], 'k': range(30)})
  with DirectFile(str(tmp_path / 't.parquet')) as f:
    writer = pq.ParquetWriter(f, table.schema)
    writer.write_table(table)
    writer.close()
  assert pq.read_table(str(tmp_path / 't.parquet')).equals(table)


def test_a_file_system_refusing_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
  real_open = os.open

  def refusing_open(path, flags, mode=0o777):
    if flags & getattr(os, 'O_DIRECT', 0):
      raise OSError(errno.EINVAL, 'Invalid argument')
    return real_open(path, flags, mode)

  monkeypatch.setattr(direct.os, 'open', refusing_open)
  path = str(tmp_path / 'f.bin')
  with DirectFile(path, buffer_size=BUFFER) as f:
    assert not f.direct
    f.write(b'z' * (BUFFER + 5))
  assert open(path, 'rb').read() == b'z' * (BUFFER + 5)


@pytest.mark.skipif(not hasattr(os, 'O_DIRECT'), reason='no O_DIRECT on this OS')
def test_o_direct_refused_at_write_time_falls_back(tmp_path, monkeypatch):
  real_write = os.write

  def refusing_write(fd, data):
    if direct.fcntl.fcntl(fd, direct.fcntl.F_GETFL) & os.O_DIRECT:
      raise OSError(errno.EINVAL, 'Invalid argument')
    return real_write(fd, data)

  monkeypatch.setattr(direct.os, 'write', refusing_write)
  path = str(tmp_path / 'f.bin')
  data = os.urandom(3 * BUFFER + 11)
  with DirectFile(path, buffer_size=BUFFER) as f:
    f.write(data)
  assert open(path, 'rb').read() == data


def test_a_failed_write_is_raised_and_the_file_closed(tmp_path, monkeypatch):
  def full_disk(fd, data):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(direct.os, 'write', full_disk)
  f = DirectFile(str(tmp_path / 'f.bin'), buffer_size=BUFFER)
  fd = f._fd
  with pytest.raises(OSError, match='No space left'):
    f.write(b'a' * (3 * BUFFER))  # the second full buffer waits on the first
  with pytest.raises(OSError, match='No space left'):
    f.close()  # what is left cannot be written either: the caller must know
  f.close()  # once closed, closing again is a no-op
  with pytest.raises(OSError):
    os.fstat(fd)  # closed, not leaked


def test_the_benchmark_knob_leaves_each_tweak_off(monkeypatch, tmp_path):
  from transforms import tuning, write

  assert tuning.keep_freed_memory()  # glibc here
  shard = write._open_local_shard(str(tmp_path / 'direct'))
  shard.close()
  if not shard.direct:
    pytest.skip(f'{tmp_path} refuses O_DIRECT')
  monkeypatch.setenv(tuning.TWEAKS_OFF, 'malloc,direct')
  assert not tuning.keep_freed_memory()
  shard = write._open_local_shard(str(tmp_path / 'shard'))
  shard.close()
  assert not shard.direct


def test_malloc_arenas_are_capped_here_and_in_child_processes(monkeypatch):
  from transforms import tuning

  # set, then removed: monkeypatch then restores whatever was there before
  monkeypatch.setenv(tuning.ARENA_VARIABLE, 'unset')
  monkeypatch.delenv(tuning.ARENA_VARIABLE)
  monkeypatch.setenv(tuning.TWEAKS_OFF, 'arenas')
  assert not tuning.limit_arenas()
  assert tuning.ARENA_VARIABLE not in os.environ
  monkeypatch.setenv(tuning.TWEAKS_OFF, '')
  assert tuning.limit_arenas()  # glibc here
  child = subprocess.run(
    [sys.executable, '-c', f'import os; print(os.environ["{tuning.ARENA_VARIABLE}"])'],
    capture_output=True,
    text=True,
    check=True,
  )
  assert child.stdout.strip() == str(tuning.ARENAS)
  monkeypatch.setenv(tuning.ARENA_VARIABLE, '7')  # the user's choice stays
  assert not tuning.limit_arenas()
  assert os.environ[tuning.ARENA_VARIABLE] == '7'
