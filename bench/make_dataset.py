"""Build a large data tree for benchmarks by replicating a base tree K times.

    python bench/make_dataset.py bench/data/x20 --copies 20
    python bench/make_dataset.py bench/data/mine --from /path/to/DATA --copies 5
    python bench/make_dataset.py bench/data/hot --one-patient 5000 \
        --from bench/data/x1.base

The base is either a real tree (--from) or one made by the project's generator
at realistic size: 256 x 256 int16 slices, 230 slices and about 25 contour
files per patient. Copy k of patient P is patient "K{k:03d}-P" (and original
id "K{k:03d}-O"). Copy 0 is hard-linked to the base where the file system
allows; every other copy is a distinct slice, as in a real tree: a new SOP
Instance UID and its last (corner) pixel set to 2000 + k, and its contour
files end with k more newlines (same polygon, other bytes). Hard-linked
copies would all be duplicates of each other (the pipeline reports and
flags those: docs/OUTPUT.md, "duplicate_slice").
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys

import pydicom

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_pipeline.tools import sample
from transforms.contract import layout


def _link_or_copy(source: str, target: str) -> None:
  try:
    os.link(source, target)
  except OSError:
    shutil.copyfile(source, target)


def _distinct_copy(source: str, target: str, k: int) -> None:
  """Copy ``k`` of a file, distinct from every other copy (module docstring)."""
  if k == 0:
    _link_or_copy(source, target)
    return
  if not source.endswith('.dcm'):
    with open(source, 'rb') as f:
      data = f.read()
    with open(target, 'wb') as f:
      f.write(data + b'\n' * k)
    return
  ds = pydicom.dcmread(source)
  ds.SOPInstanceUID = pydicom.uid.generate_uid(
    entropy_srcs=[f'{ds.SOPInstanceUID}/copy {k}']  # one string: no two (uid, k) alike
  )
  pixels = bytearray(ds.PixelData)
  pixels[-2:] = (2000 + k).to_bytes(2, 'little')
  ds.PixelData = bytes(pixels)
  ds.save_as(target)


def _links(root: str) -> list[tuple[str, str]]:
  with open(os.path.join(root, layout.LINK_FILE), 'rb') as f:
    links, problems = layout.parse_links(f.read())
  if problems:
    print(
      f'warning: {len(problems)} link.csv rows of the base are not used',
      file=sys.stderr,
    )
  return [(link.patient_id, link.original_id) for link in links]


def replicate(base: str, target: str, copies: int) -> int:
  """Writes ``copies`` renamed copies of ``base`` under ``target``; returns slices."""
  links = _links(base)
  rows, slices = [], 0
  for k in range(copies):
    for pid, oid in links:
      new_pid, new_oid = f'K{k:03d}-{pid}', f'K{k:03d}-{oid}'
      rows.append((new_pid, new_oid))
      for top, old, new in (
        (layout.DICOM_DIR, pid, new_pid),
        (layout.CONTOUR_DIR, oid, new_oid),
      ):
        source_dir = os.path.join(base, top, old)
        for dirpath, _, files in os.walk(source_dir):
          relative = os.path.relpath(dirpath, source_dir)
          out_dir = os.path.normpath(os.path.join(target, top, new, relative))
          os.makedirs(out_dir, exist_ok=True)
          for name in files:
            _distinct_copy(os.path.join(dirpath, name), os.path.join(out_dir, name), k)
            slices += top == layout.DICOM_DIR
  with open(os.path.join(target, layout.LINK_FILE), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(layout.LINK_HEADER)
    writer.writerows(rows)
  return slices


def one_patient(base: str, target: str, slices: int) -> int:
  """One patient of ``slices`` slices: the base's first patient, cycled.

  Slice k is a copy of the base slice ((k - 1) % n) + 1, with its contour
  files: the first cycle hard-linked, later ones distinct (see the module
  docstring).
  """
  (pid, oid), *_ = _links(base)
  names = os.listdir(os.path.join(base, layout.DICOM_DIR, pid))
  count = max(int(name.split('.')[0]) for name in names)
  os.makedirs(os.path.join(target, layout.DICOM_DIR, pid))
  for k in range(1, slices + 1):
    source = (k - 1) % count + 1
    _distinct_copy(
      os.path.join(base, layout.DICOM_DIR, pid, f'{source}.dcm'),
      os.path.join(target, layout.DICOM_DIR, pid, f'{k}.dcm'),
      (k - 1) // count,
    )
    for kind in ('i', 'o'):
      name = layout.contour_name(kind, source)
      path = os.path.join(base, layout.CONTOUR_DIR, oid, f'{kind}-contours', name)
      if os.path.exists(path):
        out = os.path.join(target, layout.CONTOUR_DIR, oid, f'{kind}-contours')
        os.makedirs(out, exist_ok=True)
        _distinct_copy(
          path, os.path.join(out, layout.contour_name(kind, k)), (k - 1) // count
        )
  with open(os.path.join(target, layout.LINK_FILE), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(layout.LINK_HEADER)
    writer.writerow((pid, oid))
  return slices


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('target', help='folder to create (must not exist)')
  parser.add_argument('--copies', type=int, default=1, help='K (default 1)')
  parser.add_argument('--from', dest='base', help='a real tree to replicate')
  parser.add_argument(
    '--patients', type=int, default=5, help='patients in the generated base (default 5)'
  )
  parser.add_argument(
    '--one-patient',
    type=int,
    metavar='N',
    help='instead of copies: one patient of N slices (the memory test of a '
    '"hot" patient)',
  )
  args = parser.parse_args(argv)
  if os.path.exists(args.target):
    parser.error(f'{args.target} exists')
  base = args.base
  if base is None:
    base = args.target.rstrip('/') + '.base'
    if not os.path.exists(base):
      sample.make_tree(
        base, patients=args.patients, slices=230, rows=256, columns=256, contour_every=9
      )
  if args.one_patient:
    slices = one_patient(base, args.target, args.one_patient)
    print(f'{args.target}: one patient of {slices} slices (cycled from {base})')
    return
  slices = replicate(base, args.target, args.copies)
  print(f'{args.target}: {slices} slices ({args.copies} copies of {base})')


if __name__ == '__main__':
  main()
