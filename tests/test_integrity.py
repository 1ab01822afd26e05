"""Corruption: Parquet options on leaf paths, page checksums, file digests in
the summary, a reader that refuses an altered dataset, a verify that never
tracebacks (issue 12, point 7)."""

from __future__ import annotations

import json
import os
import random
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_pipeline import dataset
from beam_pipeline.dataset import versions
from beam_pipeline.tools import verify
from tests.helpers import add_to_commit, commit_file, rewrite_record
from transforms.contract import digests, schema

_TABLES = {
  schema.SLICES_DIR: schema.SLICE_SCHEMA,
  schema.RECONCILIATION_DIR: schema.RECONCILIATION_SCHEMA,
  schema.ERRORS_DIR: schema.ERROR_SCHEMA,
}


def _copy(out, tmp_path):
  copy = str(tmp_path / 'copy')
  shutil.copytree(out, copy)
  return copy


def _files(out, folder):
  path = os.path.join(out, folder)
  return sorted(
    os.path.join(path, n) for n in os.listdir(path) if n.endswith('.parquet')
  )


def _flip(path, offset, bit=0):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << bit)]))


def test_every_leaf_gets_its_options(written):
  """Compression, dictionaries and statistics apply to every leaf, the list
  columns' included (``pixel_spacing.list.element``, not ``pixel_spacing``)."""
  for folder, arrow_schema in _TABLES.items():
    for path in _files(written.out, folder):
      meta = pq.read_metadata(path)
      for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        assert group.num_columns == len(meta.schema)
        for i in range(group.num_columns):
          chunk = group.column(i)
          top = chunk.path_in_schema.split('.')[0]
          field = arrow_schema.field(top)
          leaf = field.type
          if pa.types.is_list(leaf) or pa.types.is_fixed_size_list(leaf):
            leaf = leaf.value_type
          where = f'{os.path.basename(path)} {chunk.path_in_schema}'
          binary = top in ('image', 'i_mask', 'o_mask')
          # image: --image-codec zstd:2; masks zstd; the small columns LZ4_RAW
          # (pyarrow names both LZ4 codecs 'LZ4'; DuckDB tells them apart)
          assert chunk.compression == ('ZSTD' if binary else 'LZ4'), where
          assert chunk.has_dictionary_page == pa.types.is_string(leaf), where
          assert chunk.is_stats_set != binary, where


def test_list_columns_are_compressed(written):
  """The list columns were stored uncompressed when options named top-level
  columns: each now takes fewer bytes than its raw values."""
  (path, *_) = _files(written.out, schema.SLICES_DIR)
  group = pq.read_metadata(path).row_group(0)
  for i in range(group.num_columns):
    chunk = group.column(i)
    if chunk.path_in_schema.startswith('image_orientation_patient'):
      assert chunk.total_compressed_size < chunk.total_uncompressed_size


def test_a_flipped_bit_in_a_page_fails_its_checksum(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  (path, *_) = _files(copy, schema.SLICES_DIR)
  chunk = (
    pq.read_metadata(path)
    .row_group(0)
    .column(schema.SLICE_SCHEMA.get_field_index('slice_index'))
  )
  # The chunk's last byte is page data (its header comes first).
  _flip(path, chunk.data_page_offset + chunk.total_compressed_size - 1, bit=3)
  with pytest.raises(OSError, match='(?i)crc|checksum'):
    pq.read_table(path, page_checksum_verification=True)


def test_the_summary_records_every_file(written):
  summary = dataset.read_summary(written.out)
  on_disk = {
    os.path.relpath(p, written.out)
    for folder in _TABLES
    for p in _files(written.out, folder)
  }
  assert set(summary[digests.FILES]) == on_disk
  for name, entry in summary[digests.FILES].items():
    with open(os.path.join(written.out, name), 'rb') as f:
      data = f.read()
    assert entry['bytes'] == len(data)
    h = digests.hasher()
    h.update(data)
    assert entry[digests.ALGORITHM] == h.hexdigest()
  assert not any(
    n.endswith(digests.MANIFEST_FILE) or '.digest' in n
    for _, _, names in os.walk(written.out)
    for n in names
  )


def _record_span(path):
  """(start, end) of the run record's bytes inside a commit file."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  key = f'"{versions.RECORD_KEY}":'
  start = text.index(key) + len(key)
  _, end = json.JSONDecoder().raw_decode(text, start)
  assert text.isascii()  # so character offsets are byte offsets
  return start, end


def _refused(out, match):
  with pytest.raises(dataset.DatasetError, match=match):
    list(dataset.iter_batches(out, batch_size=8))
  with pytest.raises(dataset.DatasetError, match=match):
    dataset.open_dataset(out)


@pytest.mark.parametrize('case', ['missing', 'extra', 'truncated', 'appended'])
def test_the_reader_refuses_a_changed_file_set(written, tmp_path, case):
  copy = _copy(written.out, tmp_path)
  (path, *_) = _files(copy, schema.SLICES_DIR)
  name = os.path.basename(path)
  if case == 'missing':
    os.remove(path)
    match = f'{name} is missing'
  elif case == 'extra':
    # A file added to the version's own commit (a stray file beside the
    # tables is no version's, and no reader reads it)
    add_to_commit(copy, path, path.replace('part-', 'part-9'))
    match = "is not one of the run's files"
  else:
    size = os.path.getsize(path)
    if case == 'truncated':
      os.truncate(path, size - 100)
    else:
      with open(path, 'ab') as f:
        f.write(b'\0' * 10)
    match = f'{name} holds'
  _refused(copy, match)
  checks = verify.verify(copy)
  assert 'files match the summary' in checks.failures


def test_the_reader_refuses_an_altered_shard(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  for path in _files(copy, schema.SLICES_DIR):
    _flip(path, os.path.getsize(path) // 2)
  with pytest.raises(dataset.DatasetError, match='was altered'):
    list(dataset.iter_batches(copy, batch_size=8))


def test_a_stray_file_beside_the_tables_is_read_by_no_reader(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  (path, *_) = _files(copy, schema.SLICES_DIR)
  shutil.copy(path, path.replace('part-', 'part-9'))
  assert dataset.open_dataset(copy).count_rows() == written.manifest.slices.__len__()
  assert verify.verify(copy).failures == []


def test_the_reader_refuses_an_altered_or_missing_run_record(written, tmp_path):
  copy = _copy(written.out, tmp_path)
  commit = commit_file(copy)
  rewrite_record(commit, lambda r: r.update(labeled_only=not r['labeled_only']))
  _refused(copy, 'altered')

  def older(record):
    record.update(schema_version='2', labeled_only=not record['labeled_only'])
    record[digests.SUMMARY_DIGEST] = digests.of_summary(record)

  rewrite_record(commit, older)
  _refused(copy, 'written with schema version 2; this reader reads schema 3')
  with open(commit, 'rb') as f:
    data = f.read()
  with open(commit, 'wb') as f:
    f.write(data.replace(b'"commitInfo"', b'\xff"commitInfo"', 1))
  _refused(copy, 'unreadable')
  os.remove(commit)
  _refused(copy, 'no committed version')
  with pytest.raises(dataset.DatasetError):
    dataset.read_errors(copy)


def _flip_positions(out, rng, n):
  """``n`` (path, offset, bit): half anywhere in any file, half inside the
  non-image columns and footers of the slice shards (where flips used to
  pass unnoticed)."""
  paths = [p for folder in _TABLES for p in _files(out, folder)]
  commit = commit_file(out)
  paths.append(commit)
  positions = []
  for _ in range(n // 2):
    path = rng.choice(paths)
    if path == commit:  # inside the run record (the rest is Delta's)
      offset = rng.randrange(*_record_span(commit))
    else:
      offset = rng.randrange(os.path.getsize(path))
    positions.append((path, offset, rng.randrange(8)))
  image = schema.SLICE_SCHEMA.get_field_index('image')
  ranges = []
  for path in _files(out, schema.SLICES_DIR):
    meta = pq.read_metadata(path)
    for g in range(meta.num_row_groups):
      group = meta.row_group(g)
      for i in range(group.num_columns):
        if i != image:
          chunk = group.column(i)
          start = chunk.dictionary_page_offset or chunk.data_page_offset
          ranges.append((path, start, start + chunk.total_compressed_size))
    size = os.path.getsize(path)
    ranges.append((path, size - meta.serialized_size - 8, size))
  for _ in range(n - n // 2):
    path, start, end = rng.choice(ranges)
    positions.append((path, rng.randrange(start, end), rng.randrange(8)))
  return positions


def test_no_bit_flip_passes_verify_and_none_tracebacks(written, tmp_path, capsys):
  """Each of 80 single-bit flips, anywhere in the dataset and especially in
  the non-image columns, makes verify print FAIL and exit 1 without a
  traceback; the untouched copy passes."""
  copy = _copy(written.out, tmp_path)
  assert verify.main([copy]) == 0
  capsys.readouterr()
  rng = random.Random(12)
  for path, offset, bit in _flip_positions(copy, rng, 80):
    _flip(path, offset, bit)
    try:
      code = verify.main([copy])
    finally:
      _flip(path, offset, bit)
    out, err = capsys.readouterr()
    where = f'{os.path.relpath(path, copy)} byte {offset} bit {bit}'
    assert code == 1, where
    assert 'FAIL' in out and 'Traceback' not in out + err, where
  assert verify.main([copy]) == 0
