"""The baseline: the plain sequential script a user would write instead.

pydicom dcmread + pixel_array, the reference PIL rasteriser, one
pyarrow.Table.from_pylist and one Parquet file per patient. Same rows (image,
masks, ids) as the pipeline, without reconciliation, quality checks or
dead letters.

    python bench/baseline.py DATA OUT
"""

import csv
import os
import sys

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom


def mask(path, rows, columns):
  with open(path) as f:
    vertices = [tuple(map(float, line.split())) for line in f if line.strip()]
  img = PIL.Image.new('L', (columns, rows), 0)
  PIL.ImageDraw.Draw(img).polygon(vertices, outline=0, fill=1)
  return np.packbits(np.array(img).astype(bool)).tobytes()


def main(data, out):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(data, 'link.csv'), newline='') as f:
    links = list(csv.DictReader(f))
  for link in links:
    pid, oid = link['patient_id'], link['original_id']
    folder = os.path.join(data, 'dicoms', pid)
    rows = []
    for name in sorted(os.listdir(folder), key=lambda n: int(n.split('.')[0])):
      n = int(name.split('.')[0])
      ds = pydicom.dcmread(os.path.join(folder, name))
      image = ds.pixel_array
      row = {
        'patient_id': pid,
        'original_id': oid,
        'slice_index': n,
        'rows': ds.Rows,
        'columns': ds.Columns,
        'pixel_dtype': image.dtype.name,
        'image': image.astype(image.dtype.newbyteorder('<')).tobytes(),
      }
      for kind in 'io':
        path = os.path.join(
          data,
          'contourfiles',
          oid,
          f'{kind}-contours',
          f'IM-0001-{n:04d}-{kind}contour-manual.txt',
        )
        row[f'{kind}_mask'] = (
          mask(path, ds.Rows, ds.Columns) if os.path.exists(path) else None
        )
      rows.append(row)
    pq.write_table(
      pa.Table.from_pylist(rows),
      os.path.join(out, f'{pid}.parquet'),
      compression='zstd',
    )


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
