"""The PTransforms and DoFns on a TestPipeline."""

import os

import apache_beam as beam
import numpy as np
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline import layout, sample
from beam_pipeline import schema as s
from beam_pipeline.dataset import image_of, mask_of
from tests.conftest import reference_mask
from transforms.decode import DecodeSlicesFn, SliceChunk, SliceTask, plan_chunks
from transforms.reconcile import Patient, Reconcile


def _status(row):
  return row['patient_id'], row['original_id'], row['status']


def test_reconcile_reports_every_mismatch(tree):
  root, manifest = tree
  matched = {
    (pid, oid) for pid, oid, status in manifest.reconciliation if status == s.MATCHED
  }
  with TestPipeline() as p:
    found = p | Reconcile(root)
    assert_that(
      found['reconciliation'] | beam.Map(_status),
      equal_to(manifest.reconciliation),
      label='Reconciliation',
    )
    assert_that(
      found['errors'] | beam.Map(lambda r: (r['path'], r['stage'])),
      equal_to([e for e in manifest.errors if e[1] == s.STAGE_LIST]),
      label='Errors',
    )
    assert_that(
      found['patients'] | beam.Map(lambda pt: (pt.patient_id, pt.original_id)),
      equal_to(matched),
      label='Patients',
    )


def test_reconcile_carries_every_slice_and_contour_path(clean_tree):
  root, manifest = clean_tree

  def summarise(patient):
    return (
      patient.patient_id,
      tuple(d.slice_index for d in patient.slices),
      tuple(sorted((c.slice_index, c.kind) for c in patient.contours)),
    )

  expected = {}
  for e in manifest.slices.values():
    expected.setdefault(e.patient_id, ([], []))
    expected[e.patient_id][0].append(e.slice_index)
    expected[e.patient_id][1].extend(
      (e.slice_index, kind)
      for kind in 'io'
      if getattr(e, f'{kind}_vertices') is not None
    )
  with TestPipeline() as p:
    patients = (p | Reconcile(root))['patients']
    assert_that(
      patients | beam.Map(summarise),
      equal_to(
        [
          (pid, tuple(sorted(idx)), tuple(sorted(cs)))
          for pid, (idx, cs) in expected.items()
        ]
      ),
    )


def test_plan_chunks_splits_in_order_and_filters_labeled():
  slices = tuple(layout.DicomFile('P', k, f'dicoms/P/{k}.dcm') for k in range(1, 8))
  contours = (
    layout.ContourFile('O', 'i', 3, 'c3'),
    layout.ContourFile('O', 'o', 6, 'c6'),
  )
  patient = Patient('P', 'O', slices, contours)
  chunks = plan_chunks(patient, chunk_size=3)
  assert [len(c.slices) for c in chunks] == [2, 2, 3]  # even, none over 3
  assert [(c.chunk, c.chunks) for c in chunks] == [(0, 3), (1, 3), (2, 3)]
  assert [t.slice_index for c in chunks for t in c.slices] == list(range(1, 8))
  assert chunks[1].slices[0] == SliceTask(3, 'dicoms/P/3.dcm', 'c3', None)
  sizes = [len(c.slices) for c in plan_chunks(Patient('P', 'O', slices * 33, ()), 64)]
  assert sizes == [57, 58, 58, 58] and sum(sizes) == 231
  labeled = plan_chunks(patient, chunk_size=3, labeled_only=True)
  assert [[t.slice_index for t in c.slices] for c in labeled] == [[3, 6]]
  assert plan_chunks(Patient('P', 'O', slices, ()), 3, labeled_only=True) == []


def test_decode_slices_writes_rows_and_dead_letters(tmp_path):
  root = str(tmp_path)
  os.makedirs(tmp_path / 'dicoms' / 'P')
  pixels = sample.expected_image('P', 1, 24, 20)
  sample.write_dicom(str(tmp_path / 'dicoms/P/1.dcm'), pixels, 'P', 1)
  (tmp_path / 'dicoms/P/2.dcm').write_text('not dicom')
  square = [(4.0, 4.0), (12.0, 4.0), (12.0, 16.0), (4.0, 16.0)]
  (tmp_path / 'good.txt').write_text(''.join(f'{x} {y}\n' for x, y in square))
  (tmp_path / 'bad.txt').write_text('1 2\n')
  chunk = SliceChunk(
    'P',
    'O',
    0,
    1,
    (
      SliceTask(1, 'dicoms/P/1.dcm', 'good.txt', 'bad.txt'),
      SliceTask(2, 'dicoms/P/2.dcm', None, None),
      SliceTask(3, 'dicoms/P/3.dcm', None, None),
    ),
  )

  def check(tables):
    assert len(tables) == 1
    (row,) = tables[0].to_pylist()
    assert (row['patient_id'], row['slice_index']) == ('P', 1)
    np.testing.assert_array_equal(image_of(row), pixels)
    np.testing.assert_array_equal(mask_of(row, 'i'), reference_mask(square, 24, 20))
    assert mask_of(row, 'o') is None

  with TestPipeline() as p:
    out = (
      p
      | beam.Create([chunk])
      | beam.ParDo(DecodeSlicesFn(root)).with_outputs(
        DecodeSlicesFn.ERRORS, main='slices'
      )
    )
    assert_that(out.slices, check, label='Slices')
    assert_that(
      out[DecodeSlicesFn.ERRORS]
      | beam.Map(lambda r: (r['patient_id'], r['path'], r['stage'])),
      equal_to(
        [
          ('P', 'bad.txt', s.STAGE_CONTOUR),
          ('P', 'dicoms/P/2.dcm', s.STAGE_DECODE),
          ('P', 'dicoms/P/3.dcm', s.STAGE_READ),
        ]
      ),
      label='Errors',
    )


def test_symlink_leaving_the_input_is_not_followed(tmp_path):
  root = tmp_path / 'DATA'
  os.makedirs(root / 'dicoms' / 'P')
  decoy = tmp_path / 'outside.dcm'
  sample.write_dicom(str(decoy), sample.expected_image('P', 1, 8, 8), 'P', 1)
  os.symlink(decoy, root / 'dicoms/P/1.dcm')
  chunk = SliceChunk('P', 'O', 0, 1, (SliceTask(1, 'dicoms/P/1.dcm', None, None),))
  with TestPipeline() as p:
    out = (
      p
      | beam.Create([chunk])
      | beam.ParDo(DecodeSlicesFn(str(root))).with_outputs(
        DecodeSlicesFn.ERRORS, main='slices'
      )
    )
    assert_that(out.slices, equal_to([]), label='NoSlices')
    assert_that(
      out[DecodeSlicesFn.ERRORS]
      | beam.Map(lambda r: (r['stage'], 'outside the input root' in r['error'])),
      equal_to([(s.STAGE_READ, True)]),
      label='Errors',
    )
