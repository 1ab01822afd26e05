"""Peak memory under hostile sizes: the worker's budget holds whatever the input.

    python bench/memory.py [--compare before=REF] [--runs 1] [--write BENCHMARKS.md]

Generates three trees under bench/data/memory/ and runs the pipeline on each
with its default options, sampling the RSS of the whole process tree
(launcher, worker processes, decoder children) every 50 ms:

- ``big-images``: one patient of 64 slices of 4096 x 4096 int32 (64 MiB of
  pixels each, 4 GiB in all: one default chunk of 64 slices);
- ``deflate-bomb``: three ordinary slices and one Deflated Explicit VR file
  of about 3 MB whose data set inflates to 3 GiB;
- ``1-gib-file``: three ordinary slices and one file whose Pixel Data holds
  1 GiB (a sparse file: cheap to make, read as zeros).

``--compare LABEL=REF`` also runs another version (a git commit or a folder)
on the trees it can survive (not ``big-images``: before the budget it took
18.5 GiB, close to this machine's memory).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import struct
import sys
import tempfile
import zlib

import numpy as np
import pydicom

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))

import run  # noqa: E402  (bench/run.py: measure, settle, checkout)

from beam_pipeline.tools import sample  # noqa: E402
from transforms.decode import _native  # noqa: E402

DATA = os.path.join(BENCH, 'data', 'memory')
PID, ORIGINAL = 'SCD0000101', 'SC-HF-I-101'
BUDGET = 1 << 30  # per worker process (docs/OPTIONS.md: --max-chunk-bytes)
PIXEL_DATA = struct.pack('<HH', 0x7FE0, 0x0010)


def _tree(name: str) -> str:
  """An empty tree of one linked patient with no contours."""
  root = os.path.join(DATA, name)
  shutil.rmtree(root, ignore_errors=True)
  os.makedirs(os.path.join(root, 'dicoms', PID))
  os.makedirs(os.path.join(root, 'contourfiles', ORIGINAL))
  with open(os.path.join(root, 'link.csv'), 'w') as f:
    f.write(f'patient_id,original_id\n{PID},{ORIGINAL}\n')
  return root


def _ordinary(root: str, count: int = 3) -> None:
  for k in range(1, count + 1):
    path = os.path.join(root, 'dicoms', PID, f'{k}.dcm')
    sample.write_dicom(path, sample.expected_image(PID, k, 256, 256), PID, k)


def _template(**changes) -> pydicom.Dataset:
  buffer = io.BytesIO()
  sample.write_dicom(buffer, sample.expected_image(PID, 1, 16, 16), PID, 1)
  buffer.seek(0)
  ds = pydicom.dcmread(buffer)
  for keyword, value in changes.items():
    setattr(ds, keyword, value)
  return ds


def _split_at_pixels(ds: pydicom.Dataset) -> tuple[bytes, bytes]:
  """(file bytes before Pixel Data's element header, the header's tag + VR)."""
  buffer = io.BytesIO()
  ds.save_as(buffer, enforce_file_format=True)
  data = buffer.getvalue()
  at = data.rindex(PIXEL_DATA + b'OW')
  return data[:at], data[at : at + 8]


def big_images() -> str:
  root = _tree('big-images')
  side = 4096
  pixels = (np.arange(side * side, dtype=np.int64) * 2654435761 % 2**31).astype('<i4')
  for k in range(1, 65):
    ds = _template(
      Rows=side,
      Columns=side,
      BitsAllocated=32,
      BitsStored=32,
      HighBit=31,
      PixelRepresentation=1,
      InstanceNumber=k,
      PixelData=b'\0\0\0\0',
    )
    head, _ = _split_at_pixels(ds)
    with open(os.path.join(root, 'dicoms', PID, f'{k}.dcm'), 'wb') as f:
      f.write(head + PIXEL_DATA + b'OB\0\0' + struct.pack('<I', pixels.nbytes))
      f.write(memoryview(pixels).cast('B'))
  return root


def deflate_bomb(inflated: int = 3 << 30) -> str:
  root = _tree('deflate-bomb')
  _ordinary(root)
  ds = _template(InstanceNumber=4)
  plain = io.BytesIO()
  ds.save_as(plain, enforce_file_format=True)
  _, start = _native.file_meta(plain.getvalue())
  body = plain.getvalue()[start:]  # the explicit VR data set
  ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
  deflated = io.BytesIO()
  ds.save_as(deflated, enforce_file_format=True)
  _, start = _native.file_meta(deflated.getvalue())
  at = body.rindex(PIXEL_DATA + b'OW')
  squeeze = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
  private = struct.pack('<HH2sHI', 0x0009, 0x1000, b'OB', 0, inflated)
  with open(os.path.join(root, 'dicoms', PID, '4.dcm'), 'wb') as f:
    f.write(deflated.getvalue()[:start])  # preamble and file meta
    f.write(squeeze.compress(body[:at] + private))
    zeros = bytes(64 << 20)
    for _ in range(inflated // len(zeros)):
      f.write(squeeze.compress(zeros))
    f.write(squeeze.compress(body[at:]))
    f.write(squeeze.flush())
  return root


def one_gib_file() -> str:
  root = _tree('1-gib-file')
  _ordinary(root)
  head, tag_vr = _split_at_pixels(_template(Rows=4096, Columns=4096, InstanceNumber=4))
  path = os.path.join(root, 'dicoms', PID, '4.dcm')
  with open(path, 'wb') as f:
    f.write(head + tag_vr[:6] + b'\0\0' + struct.pack('<I', 1 << 30))
    f.truncate(f.tell() + (1 << 30))  # sparse: 1 GiB of zeros, no disk used
  return root


CASES = {
  'big-images': (big_images, '64 slices of 4096 x 4096 int32 in one patient (4 GiB)'),
  'deflate-bomb': (deflate_bomb, 'a 3 MB deflated file inflating to 3 GiB'),
  '1-gib-file': (one_gib_file, 'a file with 1 GiB of Pixel Data'),
}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', type=int, default=1)
  parser.add_argument('--compare', help='LABEL=REF: another version, same trees')
  parser.add_argument('--write', help='append the table to this Markdown file')
  parser.add_argument('--cases', default=','.join(CASES))
  args = parser.parse_args(argv)
  scratch = tempfile.mkdtemp(prefix='bench-memory-')
  other = None
  if args.compare:
    label, ref = args.compare.split('=', 1)
    other = (label, run.checkout(ref, scratch))
  lines = [
    '| case | version | peak RSS of the process tree (MiB) '
    '| budget per worker (MiB) | within | seconds |',
    '| --- | --- | --- | --- | --- | --- |',
  ]
  for name in args.cases.split(','):
    make, described = CASES[name]
    print(f'making {name}: {described}', flush=True)
    root = make()
    versions = [('this version', run.REPO)]
    if other and name != 'big-images':
      versions.append(other)
    for label, repo in versions:
      out = os.path.join(scratch, 'out')
      peaks, seconds = [], []
      for _ in range(args.runs):
        run.settle(out)
        m = run.measure(run.pipeline_command(root, out, [], repo), **run._in(repo))
        peaks.append(m.peak)
        seconds.append(m.seconds)
      peak = statistics.median(peaks)
      line = (
        f'| {described} | {label} | {peak / 2**20:.0f} | {BUDGET / 2**20:.0f} | '
        f'{"yes" if peak <= BUDGET else "no"} | {statistics.median(seconds):.1f} |'
      )
      print(line, flush=True)
      lines.append(line)
    shutil.rmtree(root)
  table = '\n'.join(lines)
  print(table)
  if args.write:
    with open(args.write, 'a') as f:
      f.write('\n' + table + '\n')
  shutil.rmtree(scratch, ignore_errors=True)


if __name__ == '__main__':
  main()
