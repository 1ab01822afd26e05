"""Read and decode DICOM files, optionally in a child process.

A C decoder that segfaults, or loops forever on a hostile file, would take the
whole worker down with it. IsolatedDecoder hands each file's *path* to a
long-lived child process, which reads and decodes it and sends back the image.
Children come from a ``forkserver``: forked from a clean single-threaded
server, so no thread or lock of the worker is inherited, and cheap to replace. A
dead or silent child becomes a Failed outcome (stage decode) for that one
slice, and a fresh child takes the rest.

The child works ahead of the worker: up to WINDOW paths are in flight, so the
child decodes the next slice while the worker rasterises the contours of the
previous one. Requests are tiny (a path), so the pipe never blocks on them.

Every decoder yields, per path and in order, a Decoded or a Failed
(transforms.outcomes).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import signal
from collections.abc import Callable, Iterator

from transforms import tuning
from transforms.contract import schema
from transforms.contract.errors import DicomError
from transforms.io import files
from transforms.io.protocol import is_local
from transforms.outcomes import Decoded, Failed, Outcome
from transforms.settings import Limits

_LOG = logging.getLogger(__name__)

WINDOW = 8

# decode(data, max_pixels, max_file_bytes), e.g. dicom.decode_dicom
Decoder = Callable[[bytes, int, int], Decoded]


def decode_bytes(data: bytes, path: str, limits: Limits, decode: Decoder) -> Outcome:
  """Decodes one file's bytes; never raises."""
  try:
    return decode(data, limits.max_pixels, limits.max_file_bytes)
  except DicomError as e:
    return Failed(schema.STAGE_DECODE, str(e))
  except Exception as e:  # MemoryError or a decoder bug: this slice only.
    # Not the path: it is where the file was read, which pseudonymisation
    # never shows; the slice's error row names it as shown.
    _LOG.warning('decoding failed: %s: %s (see the error rows)', type(e).__name__, e)
    return Failed(schema.STAGE_DECODE, f'{type(e).__name__}: {e}')


def read_and_decode(root: str, path: str, limits: Limits, decode: Decoder) -> Outcome:
  """Reads ``path`` under ``root`` and decodes it; never raises."""
  data = files.read_or_fail(root, path, limits.max_file_bytes)
  if isinstance(data, Failed):
    return data
  return decode_bytes(data, path, limits, decode)


class InProcessDecoder:
  """Reads and decodes in this process."""

  def __init__(self, root: str, decode: Decoder):
    self._root = root
    self._decode = decode

  def decode_all(
    self, paths: list[str], limits: Limits, datas: list[bytes] | None = None
  ) -> Iterator[Outcome]:
    """Outcomes of ``paths``, in order; ``datas``: their bytes, if already read."""
    for k, path in enumerate(paths):
      if datas is None:
        yield read_and_decode(self._root, path, limits, self._decode)
      else:
        yield decode_bytes(datas[k], path, limits, self._decode)

  def close(self) -> None:
    pass


def _serve(conn, root: str, decode: Decoder, memory: int | None) -> None:
  """The child's loop: answer each request until told to stop (None).

  A request is (path, data, limits): data None means "read it yourself".
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
  tuning.keep_freed_memory()
  limit_address_space(memory)
  while True:
    request = conn.recv()
    if request is None:
      return
    path, data, limits = request
    if data is None:
      conn.send(read_and_decode(root, path, limits, decode))
    else:
      conn.send(decode_bytes(data, path, limits, decode))


def _address_space() -> int | None:
  """This process's virtual memory size in bytes (Linux), or None."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[0]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return None


def limit_address_space(headroom: int | None) -> None:
  """Caps this process's address space at its current size plus
  ``headroom`` bytes (RLIMIT_AS): an allocation beyond it fails with
  MemoryError (one error row) instead of taking the machine's memory."""
  current = _address_space()
  if headroom is None or current is None:
    return
  _, hard = resource.getrlimit(resource.RLIMIT_AS)
  cap = current + headroom
  if hard != resource.RLIM_INFINITY:
    cap = min(cap, hard)
  resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def decoder_headroom(limits: Limits) -> int:
  """The memory a decoder child may allocate beyond its start: the file,
  pydicom's copy of it (or the inflated data set), the pixels it decodes and
  their little-endian copy, each at the largest the limits admit, plus
  room for the pixel plugins' own buffers."""
  return 3 * limits.max_file_bytes + 2 * 8 * limits.max_pixels + (256 << 20)


def _describe_exit(code: int | None) -> str:
  if code is not None and code < 0:
    try:
      return f'killed by signal {signal.Signals(-code).name}'
    except ValueError:
      return f'killed by signal {-code}'
  return f'exit code {code}'


class IsolatedDecoder:
  """Reads and decodes in a child process; see the module docstring.

  Args:
    root: the input root.
    decode: a module-level function (it is imported by name in the child).
    timeout: seconds one file may take before the child is killed.
    memory: bytes the child may allocate beyond its size at start
      (RLIMIT_AS; see ``decoder_headroom``), or None for no limit.
    reread: let the child read local files itself (False: always send the
      bytes the caller has, e.g. slices retrieved from a PACS).
  """

  def __init__(
    self,
    root: str,
    decode: Decoder,
    timeout: float,
    memory: int | None = None,
    reread: bool = True,
  ):
    self._root = root
    self._reread = reread and is_local(root)
    self._decode = decode
    self._timeout = timeout
    self._memory = memory
    self._context = multiprocessing.get_context('forkserver')
    self._process = None
    self._conn = None

  def _start(self) -> None:
    parent, child = self._context.Pipe()
    self._process = self._context.Process(
      target=_serve,
      args=(child, self._root, self._decode, self._memory),
      daemon=True,
      name='slice-decoder',
    )
    self._process.start()
    child.close()
    self._conn = parent

  def _discard(self) -> str:
    """Kills the child (if alive) and says how it ended."""
    self._process.kill()
    self._process.join()
    ended = _describe_exit(self._process.exitcode)
    self._conn.close()
    self._process = self._conn = None
    return ended

  def decode_all(
    self, paths: list[str], limits: Limits, datas: list[bytes] | None = None
  ) -> Iterator[Outcome]:
    """Outcomes of ``paths``, in order; ``datas``: their bytes, if already read.

    Local files are read again by the child (from the page cache: cheaper
    than sending them through the pipe), unless made with ``reread=False``
    (the bytes came from elsewhere, such as a PACS).
    """
    if self._reread:
      yield from self._decode_local(paths, limits)
      return
    # Other file systems are configured in the worker only: read here, send
    # the bytes, one file in flight (large requests must not fill both pipes).
    for k, path in enumerate(paths):
      data = (
        files.read_or_fail(self._root, path, limits.max_file_bytes)
        if datas is None
        else datas[k]
      )
      if isinstance(data, Failed):
        yield data
      else:
        yield next(self._decode_local([path], limits, data))

  def _decode_local(
    self, paths: list[str], limits: Limits, data: bytes | None = None
  ) -> Iterator[Outcome]:
    done = sent = 0
    try:
      while done < len(paths):
        if self._process is None:
          self._start()
        try:
          while sent < len(paths) and sent - done < WINDOW:
            self._conn.send((paths[sent], data, limits))
            sent += 1
          if not self._conn.poll(self._timeout):
            self._discard()
            outcome = Failed(
              schema.STAGE_DECODE, f'decoder timed out after {self._timeout:g} s'
            )
          else:
            outcome = self._conn.recv()
        except (EOFError, OSError):
          self._process.join(timeout=5)
          ended = self._discard()
          _LOG.warning(
            'a decoder process died (%s) on slice %d of %d of a chunk; starting '
            'another (an error row names the slice)',
            ended,
            done + 1,
            len(paths),
          )
          outcome = Failed(schema.STAGE_DECODE, f'decoder process crashed ({ended})')
        if self._process is None:
          sent = done + 1  # what was in flight goes to the next child
        done += 1
        yield outcome
    finally:
      if self._process is not None and sent > done:
        self._discard()  # abandoned part-way: never let stale answers through

  def close(self) -> None:
    if self._process is None:
      return
    try:
      self._conn.send(None)
      self._process.join(timeout=5)
    except OSError:
      pass
    if self._process.is_alive():
      self._process.kill()
      self._process.join()
    self._conn.close()
    self._process = self._conn = None


class DecoderPool:
  """Several decoders working at once; outcomes still come back in order.

  Paths are dealt round-robin (path i to decoder i % n); each decoder keeps its
  own requests in flight, so n children decode while the worker does the rest.
  """

  def __init__(self, decoders: list):
    self._decoders = decoders

  def decode_all(
    self, paths: list[str], limits: Limits, datas: list[bytes] | None = None
  ) -> Iterator[Outcome]:
    n = len(self._decoders)
    streams = [
      d.decode_all(paths[k::n], limits, None if datas is None else datas[k::n])
      for k, d in enumerate(self._decoders)
    ]
    for i in range(len(paths)):
      yield next(streams[i % n])

  def close(self) -> None:
    for decoder in self._decoders:
      decoder.close()
