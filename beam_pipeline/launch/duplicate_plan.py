"""Applying the duplicate plan to the staged dataset, before it is published.

The job writes every slice as it decodes it, and only knows at its end which
slices are copies of each other (``transforms.duplicates``). The plan it
leaves in the staging folder says which rows get the ``duplicate_slice`` or
``duplicate_contour`` quality flag, which copies ``--drop-duplicates`` drops,
and which patients change split. Here the shards holding any of those rows
are rewritten (row group by row group, with the writer's Parquet options),
their manifest entries and the run's counters corrected. A run without
duplicates reads the (empty) plan and nothing else.
"""

from __future__ import annotations

import collections
import io
import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms.contract import digests, filestats, metrics, schema
from transforms.io import stores
from transforms.io.protocol import is_local
from transforms.write import writer_options


def apply_plan(
  staging: str, totals: dict[str, int], image_codec: str
) -> dict[str, int]:
  """Applies ``staging``'s duplicate plan to its slices and to ``totals``
  (the run's counters, changed in place); removes the plan.

  Returns:
    {patient_id: slices dropped} (empty unless --drop-duplicates).
  """
  path = stores.join(staging, schema.DUPLICATES_PLAN_FILE)
  plan = json.loads(stores.read_bytes(path))
  stores.store(path).delete([path])
  flags: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
  for pid, index, flag in plan['flags']:
    flags[pid, index].append(flag)
  drop = {(pid, index) for pid, index in plan['drop']}
  moves = {pid: new for pid, (_, new) in plan['moves'].items()}
  if not (flags or drop or moves):
    return {}
  patients = {key[0] for key in flags} | {key[0] for key in drop} | set(moves)
  folder = stores.join(staging, schema.SLICES_DIR)
  manifest_path = stores.join(folder, digests.MANIFEST_FILE)
  manifest = json.loads(stores.read_bytes(manifest_path))
  counts: collections.Counter = collections.Counter()
  for old, new in plan['moves'].values():
    counts[metrics.split_patients_counter(old)] -= 1
    counts[metrics.split_patients_counter(new)] += 1
  for name in sorted(manifest):
    # on an object store the shard is still the sink's object (SOURCE)
    shard = manifest[name].get(digests.SOURCE) or stores.join(folder, name)
    with _readable(shard) as f:
      ids = pq.read_table(f, columns=['patient_id'])['patient_id']
    if not set(pc.unique(ids).to_pylist()) & patients:
      continue
    manifest[name].update(_rewrite(shard, flags, drop, moves, image_codec, counts))
  stores.write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())
  for key, n in counts.items():
    totals[key] = totals.get(key, 0) + n
  return dict(collections.Counter(pid for pid, _ in drop))


def _rewrite(
  shard: str,
  flags: dict,
  drop: set,
  moves: dict[str, str],
  image_codec: str,
  counts: collections.Counter,
) -> dict:
  """Rewrites one shard with the plan applied; returns its manifest entry.
  ``counts`` gathers the counter changes."""
  rewritten = shard + '.rewritten'
  sink = stores.store(rewritten).create(rewritten)
  with _readable(shard) as source:
    parquet = pq.ParquetFile(source, page_checksum_verification=True)
    writer = pq.ParquetWriter(
      sink, schema.SLICE_SCHEMA, **writer_options(schema.SLICE_SCHEMA, image_codec)
    )
    for g in range(parquet.num_row_groups):
      table = parquet.read_row_group(g)
      writer.write_table(_changed(table, flags, drop, moves, counts))
    writer.close()
  sink.close()
  stats = filestats.of_footer(writer.writer.metadata)
  stores.move_all([(rewritten, shard)])
  with _readable(shard) as f:
    size, digest = digests.of_stream(f)
  return digests.entry(size, digest, stats)


def _readable(path: str):
  """A file object for ``path``: the file itself locally, its bytes in
  memory from an object store."""
  if is_local(path):
    return open(path, 'rb')  # noqa: SIM115 (the caller closes it)
  return io.BytesIO(stores.read_bytes(path))


def _changed(
  table: pa.Table, flags: dict, drop: set, moves: dict, counts: collections.Counter
) -> pa.Table:
  rows = table.select(
    ['patient_id', 'slice_index', 'split', 'qa_flags', 'i_mask', 'o_mask']
  ).to_pylist()
  keep, splits, qa = [], [], []
  for row in rows:
    key = (row['patient_id'], row['slice_index'])
    split = row['split']
    if key in drop:
      keep.append(False)
      _count_dropped(row, counts)
      continue
    keep.append(True)
    if row['patient_id'] in moves:
      new = moves[row['patient_id']]
      counts[metrics.split_slices_counter(split)] -= 1
      counts[metrics.split_slices_counter(new)] += 1
      split = new
    added = [f for f in flags.get(key, []) if f not in row['qa_flags']]
    for flag in added:
      counts[metrics.qa_counter(flag)] += 1
    splits.append(split)
    qa.append(row['qa_flags'] + added)
  table = table.filter(pa.array(keep, pa.bool_()))
  for name, values in (('split', splits), ('qa_flags', qa)):
    field = schema.SLICE_SCHEMA.field(name)
    column = pa.array(values, type=field.type)
    table = table.set_column(table.schema.get_field_index(name), field, column)
  return table


def _count_dropped(row: dict, counts: collections.Counter) -> None:
  counts[metrics.SLICES_WRITTEN] -= 1
  counts[metrics.split_slices_counter(row['split'])] -= 1
  for kind, name in metrics.MASKS_WRITTEN.items():
    counts[name] -= row[f'{kind}_mask'] is not None
  for flag in row['qa_flags']:
    counts[metrics.qa_counter(flag)] -= 1
