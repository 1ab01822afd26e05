"""Fuzz-style: mutated DICOM bytes never crash decoding or the pipeline."""

import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.helpers import fuzz_seeds, mutate
from transforms.contract import schema
from transforms.contract.errors import DicomError
from transforms.decode.chunks import SliceChunk, SliceTask
from transforms.decode.dicom import decode_dicom
from transforms.decode.stage import DecodeSlicesFn

CASES = 400


def _only_decode_stage(stages):
  assert set(stages) <= {schema.STAGE_DECODE}, stages


@pytest.fixture(scope='module')
def mutants(tmp_path_factory):
  rng = np.random.default_rng(20261123)
  seeds = fuzz_seeds(tmp_path_factory.mktemp('fuzz'))
  return [mutate(rng, seeds) for _ in range(CASES)]


def test_decode_yields_an_image_or_a_dicom_error(mutants):
  decoded = rejected = 0
  for data in mutants:
    try:
      meta, image, *_ = decode_dicom(data)
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
