"""The whole job through main(), on generated trees, read back exactly."""

import collections
import errno
import os

import numpy as np
import pyarrow as pa
import pytest

from beam_pipeline.dataset import (
  iter_batches,
  mask_of,
  open_dataset,
  read_errors,
  read_reconciliation,
  read_summary,
  row_groups,
)
from beam_pipeline.launch import cli
from beam_pipeline.tools import problems as problems_tool
from beam_pipeline.tools import sample
from tests.helpers import dataset_tables, expected_splits, reference_mask
from transforms import write
from transforms.contract import schema


def _run(root, out, *extra):
  return cli.main(
    ['--input', root, '--output', out, '--runner', 'DirectRunner', *extra]
  )


def _column_chunks(group) -> dict:
  """A Parquet row group's column chunks by column name."""
  return {
    group.column(c).path_in_schema: group.column(c) for c in range(group.num_columns)
  }


def _check_slices(out, manifest, expect_labeled_only=False, split=(0.8, 0.1, 0.1)):
  """Every expected slice is written once; every image and mask is exact."""
  rows = open_dataset(out).to_table().to_pylist()
  expected = {
    k: e for k, e in manifest.slices.items() if e.labeled or not expect_labeled_only
  }
  keys = [(r['patient_id'], r['slice_index']) for r in rows]
  assert sorted(keys) == sorted(expected)
  split_of = expected_splits({e.patient_id for e in expected.values()}, split)
  for row in rows:
    e = expected[row['patient_id'], row['slice_index']]
    assert row['original_id'] == e.original_id
    assert row['dicom_path'] == f'dicoms/{e.patient_id}/{e.slice_index}.dcm'
    assert (row['rows'], row['columns'], row['pixel_dtype']) == (
      e.rows,
      e.columns,
      'int16',
    )
    image = np.frombuffer(row['image'], dtype='<i2').reshape(e.rows, e.columns)
    np.testing.assert_array_equal(
      image, sample.expected_image(e.patient_id, e.slice_index, e.rows, e.columns)
    )
    assert row['split'] == split_of[e.patient_id]
    references = {}
    for kind in 'io':
      vertices = getattr(e, f'{kind}_vertices')
      if vertices is None:
        assert row[f'{kind}_mask'] is None, (kind, keys)
        assert row[f'{kind}_vertex_count'] is None
        continue
      reference = references[kind] = reference_mask(vertices, e.rows, e.columns)
      assert row[f'{kind}_mask'] == np.packbits(reference).tobytes()
      np.testing.assert_array_equal(mask_of(row, kind), reference)
      assert row[f'{kind}_vertex_count'] == len(vertices)
      assert row[f'{kind}_mask_pixels'] == reference.sum()
    if len(references) == 2:
      inside = (references['i'] & references['o']).sum() / references['i'].sum()
      assert row['inner_in_outer'] == pytest.approx(inside)
      assert ('inner_outside_outer' in row['qa_flags']) == (inside < 0.99)
    else:
      assert row['inner_in_outer'] is None
  return rows


def test_every_quirk_is_reported_and_every_good_slice_lands(tree, tmp_path, capsys):
  root, manifest = tree
  out = str(tmp_path / 'OUT')
  assert _run(root, out) == cli.EXIT_DROPPED
  rows = _check_slices(out, manifest)
  assert any(r[f'{k}_mask'] is not None for r in rows for k in 'io')
  reconciliation = read_reconciliation(out).to_pylist()
  assert sorted(
    (r['patient_id'], r['original_id'], r['status']) for r in reconciliation
  ) == sorted(manifest.reconciliation)
  assert all(r['detail'] for r in reconciliation)
  errors = read_errors(out).to_pylist()
  assert sorted((r['path'], r['stage']) for r in errors) == sorted(manifest.errors)
  assert all(r['error'] for r in errors)

  summary = read_summary(out)
  assert summary['counters']['slices_written'] == len(manifest.slices)
  assert summary['counters']['errors_decode'] == sum(
    stage == schema.STAGE_DECODE for _, stage in manifest.errors
  )
  printed = capsys.readouterr().out
  assert f'slices written     {len(manifest.slices)}' in printed
  assert 'missing_dicoms: 1' in printed and 'contour: 2' in printed
  problems = [r for r in manifest.reconciliation if r[2] != schema.MATCHED]
  count = len(problems) + len(manifest.errors)
  command = f'python -m beam_pipeline.tools.problems {out}'
  unlabeled = [r for r in problems if r[2] == schema.MISSING_CONTOURS]
  assert len(unlabeled) == 1  # the one problem row that drops nothing
  assert (
    f'problems           {count} problem rows ({count - 1} for dropped inputs); '
    f'list them with: {command}'
  ) in printed
  assert problems_tool.main([out]) == 1  # the printed command, run
  listed = capsys.readouterr().out.splitlines()
  assert len(listed) == count + 1 and listed[-1].startswith(f'{count} problem rows')
  assert sorted(
    line.split('\t')[2] for line in listed if line.startswith('errors')
  ) == (sorted(path for path, _ in manifest.errors))


def test_patients_and_slices_per_split_and_an_empty_split_warns(
  clean_tree, tmp_path, capsys
):
  root, manifest = clean_tree
  out = str(tmp_path / 'OUT')
  assert _run(root, out, '--split', '1,0,0') == cli.EXIT_OK
  printed = capsys.readouterr().out
  patients = len({e.patient_id for e in manifest.slices.values()})
  assert (
    f'splits             train: {patients} patients, {len(manifest.slices)} '
    'slices; val: 0 patients, 0 slices; test: 0 patients, 0 slices'
  ) in printed
  for empty in ('val', 'test'):
    assert f'warning            split {empty} is empty' in printed
  with pytest.warns(UserWarning, match="split 'val' holds no slices"):
    assert list(iter_batches(out, batch_size=4, split='val')) == []
  with pytest.raises(ValueError, match='split must be one of'):
    list(iter_batches(out, batch_size=4, split='valid'))


def test_no_identifying_tag_reaches_the_output(tree, tmp_path):
  root, _ = tree
  out = str(tmp_path / 'OUT')
  _run(root, out)
  table = open_dataset(out).to_table()
  text = ' '.join(
    str(v)
    for name in table.column_names
    if name not in ('image', 'i_mask', 'o_mask')
    for v in table.column(name).to_pylist()
  )
  for value in sample.IDENTIFYING.values():
    assert value not in text


def test_clean_tree_exits_zero_and_schema_is_the_contract(clean_tree, tmp_path):
  root, manifest = clean_tree
  out = str(tmp_path / 'OUT')
  assert _run(root, out) == cli.EXIT_OK
  _check_slices(out, manifest)
  names = os.listdir(os.path.join(out, schema.SLICES_DIR))
  for name in [n for n in names if n.endswith('.parquet')]:
    written = pa.parquet.read_schema(os.path.join(out, schema.SLICES_DIR, name))
    assert written.equals(schema.SLICE_SCHEMA, check_metadata=False)
    assert written.field('image').metadata[b'description']
    metadata = pa.parquet.ParquetFile(
      os.path.join(out, schema.SLICES_DIR, name)
    ).metadata
    for g in range(metadata.num_row_groups):
      group = metadata.row_group(g)
      assert 0 < group.num_rows <= 64  # one SliceChunk per row group
      columns = _column_chunks(group)
      assert columns['image'].compression == 'ZSTD'  # --image-codec zstd:2
      assert columns['i_mask'].compression == 'ZSTD'
      assert columns['patient_id'].compression == 'LZ4'
      assert not columns['image'].is_stats_set and columns['slice_index'].is_stats_set
  assert read_errors(out).num_rows == 0
  assert {r['status'] for r in read_reconciliation(out).to_pylist()} == {schema.MATCHED}


def _image_chunks(out) -> list:
  return [
    _column_chunks(pa.parquet.read_metadata(path).row_group(i))['image']
    for path, i in row_groups(out)
  ]


def test_image_codec_sets_the_image_columns_codec_and_level(clean_tree, tmp_path):
  root, manifest = clean_tree
  stored = {}
  for codec in ('none', 'zstd:1', 'zstd:9'):
    out = str(tmp_path / codec.replace(':', '-'))
    assert _run(root, out, '--image-codec', codec) == cli.EXIT_OK
    _check_slices(out, manifest)
    chunks = _image_chunks(out)
    name = 'UNCOMPRESSED' if codec == 'none' else 'ZSTD'
    assert {c.compression for c in chunks} == {name}
    stored[codec] = sum(c.total_compressed_size for c in chunks)
  # the level reaches the writer: a higher one stores the same images smaller
  assert stored['zstd:9'] < stored['zstd:1'] < stored['none']


def test_labeled_only_keeps_only_contoured_slices(clean_tree, tmp_path):
  root, manifest = clean_tree
  out = str(tmp_path / 'OUT')
  # Two decoder children per worker: outcomes must still match their slices.
  assert _run(root, out, '--labeled-only', '--decoders', '2') == cli.EXIT_OK
  rows = _check_slices(out, manifest, expect_labeled_only=True)
  assert 0 < len(rows) < len(manifest.slices)


def test_small_chunks_and_another_split_give_the_same_rows(clean_tree, tmp_path):
  root, manifest = clean_tree
  out = str(tmp_path / 'OUT')
  code = _run(root, out, '--chunk-size', '1', '--split', '0.5,0.5,0')
  assert code == cli.EXIT_OK
  _check_slices(out, manifest, split=(0.5, 0.5, 0.0))


def test_a_shard_takes_a_bounded_number_of_tables(clean_tree, tmp_path, monkeypatch):
  """Past _SHARD_TABLES tables a worker starts a new shard (a Parquet writer
  holds every row group's metadata until it closes): the same rows, each
  shard within the bound, every shard in the summary."""
  root, manifest = clean_tree
  out = str(tmp_path / 'OUT')
  monkeypatch.setattr(write, '_SHARD_TABLES', 3)
  assert _run(root, out, '--chunk-size', '4') == cli.EXIT_OK
  _check_slices(out, manifest)
  folder = os.path.join(out, schema.SLICES_DIR)
  shards = sorted(n for n in os.listdir(folder) if n.endswith('.parquet'))
  # row_groups checks every file against the summary's list and digests
  per_shard = collections.Counter(path for path, _ in row_groups(out))
  assert sorted(os.path.basename(path) for path in per_shard) == shards
  assert len(shards) >= len(manifest.slices) / 4 / 3, per_shard
  assert max(per_shard.values()) <= 3, per_shard


def test_a_second_run_adds_a_version_and_the_first_stays_readable(clean_tree, tmp_path):
  root, manifest = clean_tree
  out = str(tmp_path / 'OUT')
  assert _run(root, out, '--labeled-only') == cli.EXIT_OK
  first = dataset_tables(out)
  assert _run(root, out) == cli.EXIT_OK
  _check_slices(out, manifest)  # exactly once each: no duplicate rows
  assert dataset_tables(out, version=0) == first
  assert len(dataset_tables(out)['slices']) > len(first['slices'])
  assert read_summary(out, 0)['labeled_only'] is True
  assert read_summary(out)['version'] == 1


@pytest.mark.parametrize(
  'args, message',
  [
    (['--input', '/nonexistent/tree'], 'not a data tree'),
    (['--chunk-size', '0'], '--chunk-size'),
  ],
)
def test_invalid_usage_exits_two_before_launch(args, message, tmp_path, capsys):
  code = cli.main([*args, '--output', str(tmp_path / 'OUT')])
  assert code == cli.EXIT_USAGE
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'OUT')


def test_a_failing_pipeline_exits_one_and_publishes_nothing(
  clean_tree, tmp_path, capsys, log_dir, monkeypatch
):
  """A write that fails mid-run (the disk fills) is one line naming the file
  and the cause; the previous dataset stays as it was."""
  root, _ = clean_tree
  out = tmp_path / 'OUT'
  assert _run(root, str(out)) == cli.EXIT_OK
  before = dataset_tables(str(out))

  def disk_full(self, file_handle, table):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(write._ParquetSink, 'write_record', disk_full)
  capsys.readouterr()
  code = _run(root, str(out), '--overwrite')
  assert code == cli.EXIT_FAILED
  err = capsys.readouterr().err
  (line,) = [x for x in err.splitlines() if x.startswith('error: ')]
  expected = 'error: the pipeline failed: OSError: [Errno 28] No space left on device: '
  assert line.startswith(expected + repr(str(out / '_incomplete'))[:-1]), line
  assert 'Traceback' not in err
  log_file = line.rsplit('full traceback in ', 1)[1].rstrip(')')
  assert os.path.dirname(log_file) == log_dir
  assert 'Traceback' in open(log_file).read()
  assert dataset_tables(str(out)) == before


def test_worker_processes_report_progress_without_beams_chatter(
  clean_tree, tmp_path, capsys
):
  root, manifest = clean_tree
  out = str(tmp_path / 'OUT')
  code = _run(
    root,
    out,
    '--direct_running_mode=multi_processing',
    '--direct_num_workers=2',
    '--progress-seconds',
    '0',
  )
  assert code == cli.EXIT_OK
  _check_slices(out, manifest)
  err = capsys.readouterr().err
  progress = [
    x for x in err.splitlines() if 'INFO beam_pipeline.launch.progress: ' in x
  ]
  total = len(manifest.slices)
  assert f'progress: {total}/{total} slices (100%)' in progress[-1], err[-2000:]
  done = [int(line.split('progress: ')[-1].split('/')[0]) for line in progress]
  assert done == sorted(done)  # the two processes' counts, summed
  assert 'Discarding unparseable args' not in err
  assert 'semi_persistent_directory' not in err
