"""The composite transforms on a TestPipeline: ReadLinks and ListTree,
Reconcile, DecodeSlices and WriteDataset, each on small inputs."""

import collections
import json
import os

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline.dataset import image_of, mask_of
from beam_pipeline.launch import summary
from beam_pipeline.tools import sample
from tests.helpers import reference_mask
from transforms.contract import digests, metrics, schema
from transforms.contract.layout import ContourFile, DicomFile, FileGroup, Link, Patient
from transforms.decode.chunks import SliceTask, bounds, plan_chunks
from transforms.decode.stage import DecodeSlices
from transforms.reconcile import Reconcile
from transforms.sources import listing
from transforms.sources.listing import ListTree, ReadLinks
from transforms.write import WriteDataset


def _status(row):
  return row['patient_id'], row['original_id'], row['status']


def _reconcile(p, links, dicoms, contours):
  """Reconcile applied to in-memory records, each file in a FileGroup of its
  own (an owner's files in several groups, as a listing may give them)."""
  return {
    Reconcile.LINKS: p | 'Links' >> beam.Create(links),
    Reconcile.DICOMS: p
    | 'Dicoms' >> beam.Create([FileGroup.of(d.patient_id, (d,)) for d in dicoms]),
    Reconcile.CONTOURS: p
    | 'Contours' >> beam.Create([FileGroup.of(c.original_id, (c,)) for c in contours]),
  } | Reconcile()


def _dicom(pid, k):
  return DicomFile(pid, k, f'dicoms/{pid}/{k}.dcm')


def _contour(oid, kind, k):
  return ContourFile(oid, kind, k, f'contourfiles/{oid}/{kind}-contours/{k}.txt')


def test_reconcile_reports_each_status_and_carries_only_matched_patients():
  links = [Link('P1', 'O1', 2), Link('P2', 'O2', 3), Link('P3', 'O3', 4)]
  dicoms = [_dicom('P1', 2), _dicom('P1', 1), _dicom('P2', 1), _dicom('P9', 1)]
  contours = [
    _contour('O1', 'i', 1),
    _contour('O1', 'o', 2),
    _contour('O1', 'i', 5),  # no slice 5
    _contour('O8', 'i', 1),  # no link names O8
  ]
  with TestPipeline() as p:
    found = _reconcile(p, links, dicoms, contours)
    assert_that(
      found[Reconcile.RECONCILIATION] | beam.Map(_status),
      equal_to(
        [
          ('P1', 'O1', schema.MATCHED),
          ('P1', 'O1', schema.CONTOUR_WITHOUT_DICOM),
          ('P2', 'O2', schema.MISSING_CONTOURS),
          ('P2', 'O2', schema.MATCHED),
          ('P3', 'O3', schema.MISSING_CONTOURS),
          ('P3', 'O3', schema.MISSING_DICOMS),
          ('P9', '', schema.UNLINKED_DICOMS),
          ('', 'O8', schema.UNLINKED_CONTOURS),
        ]
      ),
      label='Reconciliation',
    )
    assert_that(
      found[Reconcile.PATIENTS],
      equal_to(
        [
          Patient(
            'P1',
            'O1',
            (_dicom('P1', 1), _dicom('P1', 2)),
            (_contour('O1', 'i', 1), _contour('O1', 'o', 2)),
          ),
          Patient('P2', 'O2', (_dicom('P2', 1),), ()),
        ]
      ),
      label='Patients',
    )


def test_read_side_and_reconcile_report_every_quirk_of_a_tree(tree):
  root, manifest = tree
  matched = [
    (pid, oid)
    for pid, oid, status in manifest.reconciliation
    if status == schema.MATCHED
  ]
  with TestPipeline() as p:
    links = p | ReadLinks(root)
    files = p | ListTree(root)
    found = {
      Reconcile.LINKS: links[ReadLinks.LINKS],
      Reconcile.DICOMS: files[ListTree.DICOMS],
      Reconcile.CONTOURS: files[ListTree.CONTOURS],
    } | Reconcile()
    assert_that(
      (links[ReadLinks.RECONCILIATION], found[Reconcile.RECONCILIATION])
      | 'AllReconciliation' >> beam.Flatten()
      | 'Statuses' >> beam.Map(_status),
      equal_to(manifest.reconciliation),
      label='Reconciliation',
    )
    assert_that(
      (links[ReadLinks.ERRORS], files[ListTree.ERRORS])
      | 'AllErrors' >> beam.Flatten()
      | 'PathsAndStages' >> beam.Map(lambda r: (r['path'], r['stage'])),
      equal_to([e for e in manifest.errors if e[1] == schema.STAGE_LIST]),
      label='Errors',
    )
    assert_that(
      found[Reconcile.PATIENTS] | beam.Map(lambda pt: (pt.patient_id, pt.original_id)),
      equal_to(matched),
      label='Patients',
    )


def test_list_tree_hands_on_each_file_once_in_groups_of_its_owner(
  tmp_path, monkeypatch
):
  """A folder's files leave in one FileGroup, or several when it holds more
  than a group carries; every file exactly once, under its own owner."""
  root = str(tmp_path / 'tree')
  sample.make_tree(root, patients=3, slices=7, rows=8, columns=8, contour_every=2)
  monkeypatch.setattr(listing, '_GROUP_FILES', 3)
  with TestPipeline() as p:
    files = p | ListTree(root)
    for tag, top in ((ListTree.DICOMS, 'dicoms'), (ListTree.CONTOURS, 'contourfiles')):
      expected = _walked(root, top)
      per_owner = collections.Counter(path.split('/')[1] for path in expected)
      groups = files[tag]
      assert_that(
        groups
        | f'{tag}Paths'
        >> beam.FlatMap(lambda g: [(g.owner_id, f.path) for f in g.files]),
        equal_to([(path.split('/')[1], path) for path in expected]),
        label=f'{tag}Paths',
      )
      assert_that(
        groups | f'{tag}Sizes' >> beam.Map(lambda g: (g.owner_id, len(g.files))),
        lambda sizes, per_owner=per_owner: _check_group_sizes(sizes, per_owner, 3),
        label=f'{tag}Sizes',
      )


def _walked(root, top):
  """Every file under ``root/top``, relative to root."""
  return sorted(
    os.path.relpath(os.path.join(folder, name), root)
    for folder, _, names in os.walk(os.path.join(root, top))
    for name in names
  )


def _check_group_sizes(sizes, per_owner, most):
  """An owner of n files comes in ceil(n / most) groups of at most ``most``."""
  groups = collections.Counter(owner for owner, _ in sizes)
  assert all(0 < n <= most for _, n in sizes), sizes
  assert groups == {owner: -(-n // most) for owner, n in per_owner.items()}, sizes


def test_plan_chunks_splits_in_order_and_filters_labeled():
  slices = tuple(_dicom('P', k) for k in range(1, 8))
  contours = (ContourFile('O', 'i', 3, 'c3'), ContourFile('O', 'o', 6, 'c6'))
  patient = Patient('P', 'O', slices, contours)
  chunks = plan_chunks(patient, chunk_size=3)
  assert [len(c.slices) for c in chunks] == [2, 2, 3]  # even, none over 3
  assert [(c.chunk, c.chunks) for c in chunks] == [(0, 3), (1, 3), (2, 3)]
  assert [c.is_last for c in chunks] == [False, False, True]
  assert [t.slice_index for c in chunks for t in c.slices] == list(range(1, 8))
  assert chunks[1].slices[0] == SliceTask(3, 'dicoms/P/3.dcm', 'c3', None)
  sizes = [len(c.slices) for c in plan_chunks(Patient('P', 'O', slices * 33, ()), 64)]
  assert sizes == [57, 58, 58, 58] and sum(sizes) == 231
  labeled = plan_chunks(patient, chunk_size=3, labeled_only=True)
  assert [[t.slice_index for t in c.slices] for c in labeled] == [[3, 6]]
  assert plan_chunks(Patient('P', 'O', slices, ()), 3, labeled_only=True) == []


def test_a_pacs_series_is_one_chunk_unless_few_of_its_slices_are_kept():
  slices = tuple(_dicom('P', k) for k in range(1, 8))
  contours = (ContourFile('O', 'i', 3, 'c3'), ContourFile('O', 'o', 6, 'c6'))
  patient = Patient('P', 'O', slices, contours)
  (whole,) = plan_chunks(patient, chunk_size=3, whole_series=True)
  assert whole.whole_series and whole.is_last
  assert [t.slice_index for t in whole.slices] == list(range(1, 8))
  # 2 of 7 slices kept: retrieved one by one, in chunks as usual
  labeled = plan_chunks(patient, 3, labeled_only=True, whole_series=True)
  assert [c.whole_series for c in labeled] == [False]
  assert bounds(7, 3) == [0, 2, 4, 7] and bounds(230, 64) == [0, 57, 115, 172, 230]
  assert bounds(0, 5) == [0, 0]


def _decode(root, patients):
  """DecodeSlices on in-memory Patients: (slices, errors) PCollections and p."""
  p = TestPipeline()
  out = p | beam.Create(patients) | DecodeSlices(str(root))
  return p, out[DecodeSlices.SLICES], out[DecodeSlices.ERRORS]


def test_decode_slices_writes_rows_and_dead_letters(tmp_path):
  os.makedirs(tmp_path / 'dicoms' / 'P')
  pixels = sample.expected_image('P', 1, 24, 20)
  sample.write_dicom(str(tmp_path / 'dicoms/P/1.dcm'), pixels, 'P', 1)
  (tmp_path / 'dicoms/P/2.dcm').write_text('not dicom')
  square = [(4.0, 4.0), (12.0, 4.0), (12.0, 16.0), (4.0, 16.0)]
  (tmp_path / 'good.txt').write_text(''.join(f'{x} {y}\n' for x, y in square))
  (tmp_path / 'bad.txt').write_text('1 2\n')
  patient = Patient(
    'P',
    'O',
    (_dicom('P', 1), _dicom('P', 2), _dicom('P', 3)),
    (ContourFile('O', 'i', 1, 'good.txt'), ContourFile('O', 'o', 1, 'bad.txt')),
  )

  def check(tables):
    assert len(tables) == 1
    (row,) = tables[0].to_pylist()
    assert (row['patient_id'], row['original_id'], row['slice_index']) == ('P', 'O', 1)
    np.testing.assert_array_equal(image_of(row), pixels)
    np.testing.assert_array_equal(mask_of(row, 'i'), reference_mask(square, 24, 20))
    assert mask_of(row, 'o') is None and row['i_vertex_count'] == 4
    assert row['modality'] == 'MR' and row['pixel_dtype'] == 'int16'

  p, slices, errors = _decode(tmp_path, [patient])
  assert_that(slices, check, label='Slices')
  assert_that(
    errors | beam.Map(lambda r: (r['patient_id'], r['path'], r['stage'])),
    equal_to(
      [
        ('P', 'bad.txt', schema.STAGE_CONTOUR),
        ('P', 'dicoms/P/2.dcm', schema.STAGE_DECODE),
        ('P', 'dicoms/P/3.dcm', schema.STAGE_READ),
      ]
    ),
    label='Errors',
  )
  result = p.run()
  result.wait_until_finish()
  counted = summary.counters(result)
  assert counted[metrics.SLICES_WRITTEN] == 1 and counted[metrics.PATIENTS_DONE] == 1
  assert counted[metrics.I_MASKS_WRITTEN] == 1
  assert counted.get(metrics.O_MASKS_WRITTEN, 0) == 0


def test_symlink_leaving_the_input_is_not_followed(tmp_path):
  root = tmp_path / 'DATA'
  os.makedirs(root / 'dicoms' / 'P')
  decoy = tmp_path / 'outside.dcm'
  sample.write_dicom(str(decoy), sample.expected_image('P', 1, 8, 8), 'P', 1)
  os.symlink(decoy, root / 'dicoms/P/1.dcm')
  p, slices, errors = _decode(root, [Patient('P', 'O', (_dicom('P', 1),), ())])
  assert_that(slices, equal_to([]), label='NoSlices')
  assert_that(
    errors | beam.Map(lambda r: (r['stage'], 'outside the input root' in r['error'])),
    equal_to([(schema.STAGE_READ, True)]),
    label='Errors',
  )
  p.run().wait_until_finish()


def _slice_table(patient_id, indices):
  """A minimal Arrow table of slice rows (2 x 2 uint8 images)."""
  rows = []
  for k in indices:
    image = np.full((2, 2), k, np.uint8)
    rows.append(
      {
        'patient_id': patient_id,
        'original_id': 'O' + patient_id,
        'slice_index': k,
        'split': 'train',
        'dicom_path': f'dicoms/{patient_id}/{k}.dcm',
        'rows': 2,
        'columns': 2,
        'samples_per_pixel': 1,
        'pixel_dtype': 'uint8',
        'image': image.tobytes(),
        'pixel_xxh3': f'{k:032x}',
        'qa_flags': [],
      }
    )
  return pa.Table.from_pylist(rows, schema=schema.SLICE_SCHEMA)


def test_write_dataset_writes_three_tables_and_counts_the_reports(tmp_path):
  out = str(tmp_path / 'OUT')
  tables = [_slice_table('A', [1, 2, 3]), _slice_table('B', [1])]
  reconciliation = [
    schema.reconciliation_row('A', 'OA', schema.MATCHED, '3 slices'),
    schema.reconciliation_row('B', 'OB', schema.MATCHED, '1 slice'),
    schema.reconciliation_row('C', 'OC', schema.MISSING_DICOMS, 'line 4'),
  ]
  errors = [schema.error_row('A', 'dicoms/A/9.dcm', schema.STAGE_DECODE, 'truncated')]
  p = TestPipeline()
  written = {
    WriteDataset.SLICES: p | 'Tables' >> beam.Create(tables),
    WriteDataset.RECONCILIATION: p | 'Rec' >> beam.Create(reconciliation),
    WriteDataset.ERRORS: p | 'Err' >> beam.Create(errors),
  } | WriteDataset(out, image_codec='zstd')
  assert_that(
    written[WriteDataset.ERRORS] | beam.Map(os.path.relpath, out),
    equal_to(['errors/part-00000-of-00001.parquet']),
    label='ErrorsFile',
  )
  result = p.run()
  result.wait_until_finish()

  names = sorted(os.listdir(os.path.join(out, 'slices')))
  parquet = [n for n in names if n.endswith('.parquet')]
  assert names == sorted([*parquet, digests.MANIFEST_FILE])  # nothing else
  with open(os.path.join(out, 'slices', digests.MANIFEST_FILE)) as f:
    assert sorted(json.load(f)) == parquet
  shards = [pq.ParquetFile(os.path.join(out, 'slices', name)) for name in parquet]
  assert all(f.schema_arrow.equals(schema.SLICE_SCHEMA) for f in shards)
  groups = [f.metadata.row_group(g) for f in shards for g in range(f.num_row_groups)]
  assert sorted(g.num_rows for g in groups) == [1, 3]  # one row group per table
  image_chunk = (
    shards[0].metadata.row_group(0).column(schema.SLICE_SCHEMA.names.index('image'))
  )
  assert image_chunk.compression == 'ZSTD'
  read_back = pq.read_table(os.path.join(out, 'reconciliation')).to_pylist()
  assert sorted(map(_status, read_back)) == sorted(map(_status, reconciliation))
  assert pq.read_table(os.path.join(out, 'errors')).to_pylist() == errors
  counted = summary.counters(result)
  assert counted[metrics.reconciliation_counter(schema.MATCHED)] == 2
  assert counted[metrics.reconciliation_counter(schema.MISSING_DICOMS)] == 1
  assert counted[metrics.error_counter(schema.STAGE_DECODE)] == 1
