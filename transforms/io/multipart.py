"""A streaming reader of multipart/related bodies (RFC 2046), part by part.

A WADO-RS series retrieve answers with every instance of the series in one
multipart/related body, often larger than a worker should hold. ``parts``
reads it a block at a time: each part's first bytes go to ``choose``, which
names the part or passes it over, and only the parts it names are kept, each
up to ``limit`` bytes. What is held at once is one block, one part's head and
the part being kept.

A part's end is its Content-Length when it gives one (checked: the delimiter
must follow), else the next delimiter.
"""

from __future__ import annotations

import email.message
import email.parser
from collections.abc import Callable, Iterator
from typing import NamedTuple

BLOCK = 256 * 1024
HEAD_BYTES = 16 * 1024  # what ``choose`` sees of a part
_MAX_HEADERS = 16 * 1024
_MAX_PREAMBLE = 64 * 1024


class MultipartError(ValueError):
  """The body is not a well-formed multipart body."""


class Part(NamedTuple):
  """A part ``choose`` named: ``data`` holds it, or is None when it held
  more than the limit (``size``: its Content-Length, or the bytes seen)."""

  key: object
  data: bytes | None
  size: int


def boundary_of(content_type: str) -> bytes:
  """The boundary of a multipart Content-Type.

  Raises:
    MultipartError: not multipart, or without a boundary.
  """
  message = email.message.Message()
  message['content-type'] = content_type or 'application/octet-stream'
  boundary = message.get_param('boundary')
  if message.get_content_maintype() != 'multipart' or not isinstance(boundary, str):
    raise MultipartError(f'the answer is {message.get_content_type()}, not multipart')
  if not 1 <= len(boundary) <= 200:
    raise MultipartError('the multipart boundary is empty or too long')
  return boundary.encode('latin-1')


class _Buffer:
  """Bytes read from ``read`` and not yet consumed."""

  def __init__(self, read: Callable[[int], bytes]):
    self._read = read
    self._data = bytearray()
    self._pos = 0
    self.eof = False

  def __len__(self) -> int:
    return len(self._data) - self._pos

  def fill(self) -> bool:
    """Reads a block more; False at the end of the body."""
    if self.eof:
      return False
    block = self._read(BLOCK)
    if not block:
      self.eof = True
      return False
    if self._pos > len(self._data) // 2:  # compact, now and then
      del self._data[: self._pos]
      self._pos = 0
    self._data += block
    return True

  def find(self, needle: bytes, start: int = 0) -> int:
    """Where ``needle`` starts, relative to the unconsumed bytes, or -1."""
    at = self._data.find(needle, self._pos + start)
    return -1 if at < 0 else at - self._pos

  def peek(self, n: int) -> bytes:
    return bytes(self._data[self._pos : self._pos + n])

  def take(self, n: int) -> bytes:
    out = bytes(self._data[self._pos : self._pos + n])
    self._pos += len(out)
    return out

  def drop(self, n: int) -> None:
    self._pos += min(n, len(self))

  def need(self, n: int) -> None:
    """Reads until ``n`` bytes are unconsumed.

    Raises:
      MultipartError: the body ends first.
    """
    while len(self) < n:
      if not self.fill():
        raise MultipartError('the multipart body ends in the middle of a part')


def parts(
  read: Callable[[int], bytes],
  boundary: bytes,
  choose: Callable[[email.message.Message, bytes], object],
  limit: int | None = None,
) -> Iterator[Part]:
  """The parts of a multipart body that ``choose`` names, in the body's order.

  Args:
    read: reads up to n bytes of the body (b'' at its end).
    boundary: from the Content-Type (``boundary_of``).
    choose: (the part's headers, its first HEAD_BYTES bytes or all of it if
      shorter) -> a key naming the part, or None to pass it over unread.
    limit: the largest part kept; a larger one is a Part without data.

  Raises:
    MultipartError: the body is malformed or ends early.
  """
  buffer = _Buffer(read)
  delimiter = b'--' + boundary
  following = b'\r\n' + delimiter
  _skip_preamble(buffer, delimiter)
  while True:
    buffer.need(2)
    if buffer.peek(2) == b'--':
      return  # the close delimiter; an epilogue is not read
    headers = _headers(buffer)
    declared = (headers.get('Content-Length') or '').strip()
    length = int(declared) if declared.isdigit() else None
    if length is not None:
      yield from _sized_part(buffer, headers, length, following, choose, limit)
    else:
      yield from _delimited_part(buffer, headers, following, choose, limit)
    buffer.need(len(following))
    if buffer.peek(len(following)) != following:
      raise MultipartError('a part does not end where its Content-Length says')
    buffer.drop(len(following))


def _skip_preamble(buffer: _Buffer, delimiter: bytes) -> None:
  while (at := buffer.find(delimiter)) < 0:
    if len(buffer) > _MAX_PREAMBLE or not buffer.fill():
      raise MultipartError('no multipart delimiter in the answer')
  buffer.drop(at + len(delimiter))


def _headers(buffer: _Buffer) -> email.message.Message:
  """The headers after a delimiter (its transport padding and line end
  included), consumed up to the part's first byte."""
  while (end := buffer.find(b'\r\n\r\n')) < 0:
    if len(buffer) > _MAX_HEADERS or not buffer.fill():
      raise MultipartError('a part has no end to its headers')
  text = buffer.take(end + 4).decode('latin-1')
  line_end = text.find('\r\n')
  if text[:line_end].strip(' \t'):
    raise MultipartError('a multipart delimiter is followed by other text')
  return email.parser.Parser().parsestr(text[line_end + 2 :], headersonly=True)


def _sized_part(buffer, headers, length, following, choose, limit) -> Iterator[Part]:
  head = min(length, HEAD_BYTES)
  buffer.need(head)
  key = choose(headers, buffer.peek(head))
  if key is None or (limit is not None and length > limit):
    remaining = length
    while remaining:
      if not len(buffer):
        buffer.need(1)
      step = min(remaining, len(buffer))
      buffer.drop(step)
      remaining -= step
    if key is not None:
      yield Part(key, None, length)
    return
  buffer.need(length)
  yield Part(key, buffer.take(length), length)


def _delimited_part(buffer, headers, following, choose, limit) -> Iterator[Part]:
  while (end := buffer.find(following)) < 0 and len(buffer) < HEAD_BYTES:
    buffer.need(len(buffer) + 1)
  head = end if 0 <= end < HEAD_BYTES else HEAD_BYTES
  key = choose(headers, buffer.peek(head))
  kept: list[bytes] = []
  seen = 0
  too_large = False
  keep_tail = len(following) - 1  # a delimiter may straddle two blocks
  while (end := buffer.find(following)) < 0:
    safe = max(0, len(buffer) - keep_tail)
    seen += safe
    if key is not None and limit is not None and seen > limit:
      too_large, kept = True, []
    if key is None or too_large:
      buffer.drop(safe)
    else:
      kept.append(buffer.take(safe))
    buffer.need(len(buffer) + 1)
  seen += end
  if key is None:
    buffer.drop(end)
    return
  if too_large or (limit is not None and seen > limit):
    buffer.drop(end)
    yield Part(key, None, seen)
    return
  kept.append(buffer.take(end))
  yield Part(key, b''.join(kept), seen)
