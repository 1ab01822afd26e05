"""Decoders that misbehave on purpose, for the containment tests.

They must be module-level functions: the isolated decoder imports them by name
in its child process. A file whose bytes start with one of the markers below
triggers the fault; anything else is decoded normally.
"""

import ctypes
import time

from transforms.decode.dicom import decode_dicom

SEGFAULT = b'SEGFAULT'
HANG = b'HANG'
MEMORY = b'MEMORY'
BALLOON = b'BALLOON'  # allocates (and touches) 1 GiB


def misbehaving_decode(data: bytes, max_pixels: int, max_file_bytes: int):
  if data.startswith(SEGFAULT):
    ctypes.string_at(0)  # reads address 0: SIGSEGV
  if data.startswith(HANG):
    time.sleep(3600)
  if data.startswith(MEMORY):
    raise MemoryError('simulated out of memory')
  if data.startswith(BALLOON):
    bytearray(1 << 30)
  return decode_dicom(data, max_pixels, max_file_bytes)
