"""Writing shards around the page cache (O_DIRECT), with a writer thread.

A buffered write() copies every byte into page-cache pages the kernel must
first allocate. On the benchmark machine (a VM whose host reclaims idle guest
memory) new pages are dear, which made the page-cache copy the largest
single cost of a run (BENCHMARKS.md, "Figures behind the code"). With O_DIRECT the disk
reads the data straight from our own buffers, which are reused for the
whole file.

DirectFile buffers writes in two aligned buffers: while one is filled, a
thread writes the other (os.write releases the GIL), so the disk works while
the worker decodes. The last, partial block is padded to the alignment and the
file then truncated to its true size. Where the file system refuses O_DIRECT
(tmpfs, some network file systems; EINVAL) or the platform has none, the same
class writes through the page cache, so callers need no fallback of their own.
"""

from __future__ import annotations

import errno
import fcntl
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from transforms.io.protocol import AppendOnlyFile

ALIGNMENT = 4096  # covers 512-byte and 4 KiB logical blocks
BUFFER_SIZE = 8 * 1024 * 1024


def _aligned(size: int) -> memoryview:
  raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
  start = -raw.ctypes.data % ALIGNMENT
  return memoryview(raw[start : start + size])


class DirectFile(AppendOnlyFile):
  """A write-only binary file that bypasses the page cache where it can.

  Args:
    path: the file to create (or truncate); its folder is created.
    buffer_size: bytes per buffer, a multiple of ALIGNMENT.
    direct: False to write through the page cache (as where O_DIRECT fails).
  """

  def __init__(self, path: str, buffer_size: int = BUFFER_SIZE, direct: bool = True):
    if buffer_size % ALIGNMENT:
      raise ValueError(f'buffer_size must be a multiple of {ALIGNMENT}')
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, 'O_CLOEXEC', 0)
    self.direct = direct and hasattr(os, 'O_DIRECT')
    self._fd = -1
    if self.direct:
      try:
        self._fd = os.open(path, flags | os.O_DIRECT, 0o644)
      except OSError as e:
        if e.errno != errno.EINVAL:
          raise
        self.direct = False
    if self._fd < 0:
      self._fd = os.open(path, flags, 0o644)
    self._buffers = [_aligned(buffer_size), _aligned(buffer_size)]
    self._fill = 0  # bytes in the current buffer
    self.size = 0  # bytes accepted so far
    self._pending: Future | None = None
    self._executor = ThreadPoolExecutor(
      max_workers=1, thread_name_prefix='shard-writer'
    )
    self.closed = False

  def flush(self) -> None:
    """Nothing to do: data reaches the disk when a buffer fills, and at close."""

  def write(self, data) -> int:
    if self.closed:
      raise ValueError('write to a closed DirectFile')
    view = memoryview(data).cast('B')
    size = len(view)
    buffer = self._buffers[0]
    while view:
      n = min(len(view), len(buffer) - self._fill)
      buffer[self._fill : self._fill + n] = view[:n]
      self._fill += n
      view = view[n:]
      if self._fill == len(buffer):
        self._hand_over()
        buffer = self._buffers[0]
    self.size += size
    return size

  def _hand_over(self) -> None:
    """Starts writing the full current buffer; the other becomes current."""
    self._wait()
    full = self._buffers[0]
    self._pending = self._executor.submit(self._write_all, full)
    self._buffers.reverse()
    self._fill = 0

  def _wait(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()  # re-raises a failed write here, in the caller

  def _write_all(self, data: memoryview) -> None:
    while data:
      try:
        written = os.write(self._fd, data)
      except OSError as e:
        if e.errno != errno.EINVAL or not self.direct:
          raise
        # Accepted at open, refused at write (some file systems): go buffered.
        fcntl.fcntl(
          self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT
        )
        self.direct = False
        continue
      data = data[written:]

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    try:
      self._wait()
      if self._fill:
        padded = -self._fill % ALIGNMENT if self.direct else 0
        buffer = self._buffers[0]
        buffer[self._fill : self._fill + padded] = bytes(padded)
        self._write_all(buffer[: self._fill + padded])
        if padded:
          os.ftruncate(self._fd, self.size)
    finally:
      self._executor.shutdown(wait=True)
      os.close(self._fd)

  def __enter__(self) -> DirectFile:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
