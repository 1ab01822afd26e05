"""Fuzz-style: mutated DICOM bytes never crash decoding or the pipeline."""

import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from pydicom.data import get_testdata_file

from beam_pipeline import sample
from beam_pipeline import schema as s
from beam_pipeline.errors import DicomError
from transforms.decode import DecodeSlicesFn, SliceChunk, SliceTask, decode_dicom

CASES = 400


def _seeds(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('fuzz') / 'seed.dcm')
  sample.write_dicom(path, sample.expected_image('F', 1, 24, 24), 'F', 1)
  names = [
    'MR_small.dcm',
    'MR_small_RLE.dcm',
    'MR_small_jp2klossless.dcm',
    'MR_small_jpeg_ls_lossless.dcm',
    'MR_small_bigendian.dcm',
    'SC_rgb_jpeg_dcmtk.dcm',
  ]
  seeds = [open(path, 'rb').read()]
  seeds += [open(get_testdata_file(name), 'rb').read() for name in names]
  return seeds


def mutate(rng: np.random.Generator, seeds: list[bytes]) -> bytes:
  """One mutation: truncate, flip bytes, splice two files, or insert noise."""
  data = bytearray(seeds[int(rng.integers(len(seeds)))])
  kind = int(rng.integers(4))
  if kind == 0:
    return bytes(data[: int(rng.integers(len(data)))])
  if kind == 1:
    for _ in range(int(rng.integers(1, 16))):
      at = int(rng.integers(len(data)))
      data[at] ^= 1 << int(rng.integers(8))
    return bytes(data)
  if kind == 2:
    other = seeds[int(rng.integers(len(seeds)))]
    return bytes(
      data[: int(rng.integers(len(data)))] + other[int(rng.integers(len(other))) :]
    )
  at = int(rng.integers(len(data)))
  noise = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
  return bytes(data[:at] + noise + data[at:])


def _only_decode_stage(stages):
  assert set(stages) <= {s.STAGE_DECODE}, stages


@pytest.fixture(scope='module')
def mutants(tmp_path_factory):
  rng = np.random.default_rng(20261123)
  seeds = _seeds(tmp_path_factory)
  return [mutate(rng, seeds) for _ in range(CASES)]


def test_decode_yields_an_image_or_a_dicom_error(mutants):
  decoded = rejected = 0
  for data in mutants:
    try:
      meta, image = decode_dicom(data)
    except DicomError as e:
      assert str(e)
      rejected += 1
      continue
    decoded += 1
    expected = (meta['rows'], meta['columns'])
    assert image.shape[:2] == expected and image.flags.c_contiguous
  assert decoded > 0 and rejected > 0  # the mutations hit both ways


def test_pipeline_writes_a_row_or_an_error_for_every_mutant(mutants, tmp_path):
  root = tmp_path / 'DATA'
  os.makedirs(root / 'dicoms' / 'F')
  tasks = []
  for k, data in enumerate(mutants[:120], start=1):
    (root / 'dicoms' / 'F' / f'{k}.dcm').write_bytes(data)
    tasks.append(SliceTask(k, f'dicoms/F/{k}.dcm', None, None))
  chunks = [
    SliceChunk('F', 'G', n, 12, tuple(tasks[n * 10 : (n + 1) * 10])) for n in range(12)
  ]
  with TestPipeline() as p:
    out = (
      p
      | beam.Create(chunks)
      | beam.ParDo(DecodeSlicesFn(str(root))).with_outputs(
        DecodeSlicesFn.ERRORS, main='slices'
      )
    )
    rows = out.slices | beam.FlatMap(
      lambda table: table.column('slice_index').to_pylist()
    )
    errors = out[DecodeSlicesFn.ERRORS] | beam.Map(
      lambda r: (int(r['path'].split('/')[-1][:-4]), r['stage'])
    )
    both = (
      rows | 'RowKeys' >> beam.Map(lambda k: k),
      errors | 'ErrorKeys' >> beam.Map(lambda e: e[0]),
    ) | beam.Flatten()
    assert_that(both, equal_to(list(range(1, 121))), label='EachOnce')
    assert_that(
      errors | beam.Map(lambda e: e[1]) | beam.Distinct(),
      _only_decode_stage,
      label='DecodeStage',
    )
