"""File access under the input root, through Beam's FileSystems.

Every read goes through :func:`read_input`, which joins a path relative to the
input root and, on local disks, refuses any file whose real location (after
symlinks) lies outside that root.
"""

from __future__ import annotations

import os

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.errors import UnsafePathError


def is_local(path: str) -> bool:
  """True for a path on the local disk (no ``scheme://``)."""
  return '://' not in path


def join_path(root: str, relative: str) -> str:
  """The full path of ``relative`` (always ``/``-separated) under ``root``."""
  return FileSystems.join(root, *relative.split('/'))


def relative_to(root: str, path: str) -> str:
  """``path`` relative to ``root``, ``/``-separated.

  Raises:
    UnsafePathError: ``path`` is not below ``root``.
  """
  prefix = root.rstrip('/') + '/'
  if is_local(path):
    path = path.replace(os.sep, '/')
  if not path.startswith(prefix):
    raise UnsafePathError(f'{path} is not under the input root {root}')
  return path[len(prefix) :]


def _check_inside(root: str, full_path: str) -> None:
  real_root = os.path.realpath(root)
  real = os.path.realpath(full_path)
  if os.path.commonpath([real_root, real]) != real_root:
    raise UnsafePathError(
      f'resolves outside the input root (to {real}); symlinks leaving the '
      'input are not followed'
    )


def read_input(root: str, relative: str) -> bytes:
  """Reads a whole file under the input root.

  Raises:
    UnsafePathError: the file resolves outside ``root``.
    OSError: the file cannot be read.
  """
  full_path = join_path(root, relative)
  if is_local(full_path):
    _check_inside(root, full_path)
  with FileSystems.open(full_path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()
