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
import signal
from collections.abc import Callable, Iterator

from beam_pipeline.contract import schema as s
from beam_pipeline.contract.errors import DicomError
from beam_pipeline.contract.layout import is_local
from transforms import _files, _tuning
from transforms.outcomes import Decoded, Failed, Outcome

_LOG = logging.getLogger(__name__)

WINDOW = 8

Decoder = Callable[[bytes, int], Decoded]


def decode_bytes(data: bytes, path: str, max_pixels: int, decode: Decoder) -> Outcome:
  """Decodes one file's bytes; never raises."""
  try:
    return decode(data, max_pixels)
  except DicomError as e:
    return Failed(s.STAGE_DECODE, str(e))
  except Exception as e:  # MemoryError or a decoder bug: this slice only.
    _LOG.warning('%s: %s: %s', path, type(e).__name__, e)
    return Failed(s.STAGE_DECODE, f'{type(e).__name__}: {e}')


def read_and_decode(root: str, path: str, max_pixels: int, decode: Decoder) -> Outcome:
  """Reads ``path`` under ``root`` and decodes it; never raises."""
  data = _files.read_or_fail(root, path)
  if isinstance(data, Failed):
    return data
  return decode_bytes(data, path, max_pixels, decode)


class InProcessDecoder:
  """Reads and decodes in this process."""

  def __init__(self, root: str, decode: Decoder):
    self._root = root
    self._decode = decode

  def decode_all(
    self, paths: list[str], max_pixels: int, datas: list[bytes] | None = None
  ) -> Iterator[Outcome]:
    """Outcomes of ``paths``, in order; ``datas``: their bytes, if already read."""
    for k, path in enumerate(paths):
      if datas is None:
        yield read_and_decode(self._root, path, max_pixels, self._decode)
      else:
        yield decode_bytes(datas[k], path, max_pixels, self._decode)

  def close(self) -> None:
    pass


def _serve(conn, root: str, decode: Decoder) -> None:
  """The child's loop: answer each request until told to stop (None).

  A request is (path, data, max_pixels): data None means "read it yourself".
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
  _tuning.keep_freed_memory()
  while True:
    request = conn.recv()
    if request is None:
      return
    path, data, max_pixels = request
    if data is None:
      conn.send(read_and_decode(root, path, max_pixels, decode))
    else:
      conn.send(decode_bytes(data, path, max_pixels, decode))


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
  """

  def __init__(self, root: str, decode: Decoder, timeout: float):
    self._root = root
    self._decode = decode
    self._timeout = timeout
    self._context = multiprocessing.get_context('forkserver')
    self._process = None
    self._conn = None

  def _start(self) -> None:
    parent, child = self._context.Pipe()
    self._process = self._context.Process(
      target=_serve,
      args=(child, self._root, self._decode),
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
    self, paths: list[str], max_pixels: int, datas: list[bytes] | None = None
  ) -> Iterator[Outcome]:
    """Outcomes of ``paths``, in order; ``datas``: their bytes, if already read.

    Local files are read again by the child (from the page cache: cheaper
    than sending them through the pipe).
    """
    if is_local(self._root):
      yield from self._decode_local(paths, max_pixels)
      return
    # Other file systems are configured in the worker only: read here, send
    # the bytes, one file in flight (large requests must not fill both pipes).
    for k, path in enumerate(paths):
      data = _files.read_or_fail(self._root, path) if datas is None else datas[k]
      if isinstance(data, Failed):
        yield data
      else:
        yield next(self._decode_local([path], max_pixels, data))

  def _decode_local(
    self, paths: list[str], max_pixels: int, data: bytes | None = None
  ) -> Iterator[Outcome]:
    done = sent = 0
    try:
      while done < len(paths):
        if self._process is None:
          self._start()
        try:
          while sent < len(paths) and sent - done < WINDOW:
            self._conn.send((paths[sent], data, max_pixels))
            sent += 1
          if not self._conn.poll(self._timeout):
            self._discard()
            outcome = Failed(
              s.STAGE_DECODE, f'decoder timed out after {self._timeout:g} s'
            )
          else:
            outcome = self._conn.recv()
        except (EOFError, OSError):
          self._process.join(timeout=5)
          ended = self._discard()
          _LOG.warning(
            'decoder process died on %s (%s); starting another', paths[done], ended
          )
          outcome = Failed(s.STAGE_DECODE, f'decoder process crashed ({ended})')
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
    self, paths: list[str], max_pixels: int, datas: list[bytes] | None = None
  ) -> Iterator[Outcome]:
    n = len(self._decoders)
    streams = [
      d.decode_all(paths[k::n], max_pixels, None if datas is None else datas[k::n])
      for k, d in enumerate(self._decoders)
    ]
    for i in range(len(paths)):
      yield next(streams[i % n])

  def close(self) -> None:
    for decoder in self._decoders:
      decoder.close()
