"""The limit: decode only (dcmread + pixel_array of every slice), split over N
processes; no masks, no writing. What no pipeline on this machine can beat by
much with pydicom's decoder.

    python bench/limit.py DATA N
"""

import glob
import multiprocessing
import os
import sys

import pydicom


def decode(path):
  return pydicom.dcmread(path).pixel_array.nbytes


def main(data, processes):
  paths = sorted(glob.glob(os.path.join(data, 'dicoms', '*', '*.dcm')))
  with multiprocessing.Pool(processes) as pool:
    total = sum(pool.imap_unordered(decode, paths, chunksize=64))
  print(f'{len(paths)} slices, {total} bytes decoded')


if __name__ == '__main__':
  main(sys.argv[1], int(sys.argv[2]))
