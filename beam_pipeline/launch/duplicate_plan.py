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
import json
import logging
from collections.abc import Callable, Iterable
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transforms.contract import digests, filestats, metrics, schema
from transforms.io import stores
from transforms.write import writer_options

_LOG = logging.getLogger(__name__)


class Plan(NamedTuple):
  """The duplicate plan: ``flags`` {(patient_id, slice_index): [flag]},
  ``drop`` {(patient_id, slice_index)}, ``moves`` {patient_id: (from, to)}."""

  flags: dict[tuple[str, int], list[str]]
  drop: set[tuple[str, int]]
  moves: dict[str, tuple[str, str]]

  def touches(self) -> set[str]:
    """The patients whose rows the plan changes."""
    return {k[0] for k in self.flags} | {k[0] for k in self.drop} | set(self.moves)


def load_plan(staging: str) -> Plan:
  """The plan the job left in ``staging``; removes it."""
  path = stores.join(staging, schema.DUPLICATES_PLAN_FILE)
  found = json.loads(stores.read_bytes(path))
  stores.store(path).delete([path])
  flags: dict[tuple[str, int], list[str]] = collections.defaultdict(list)
  for pid, index, flag in found['flags']:
    flags[pid, index].append(flag)
  drop = {(pid, index) for pid, index in found['drop']}
  moves = {pid: (old, new) for pid, (old, new) in found['moves'].items()}
  return Plan(dict(flags), drop, moves)


def apply_plan(
  staging: str, plan: Plan, totals: dict[str, int], image_codec: str
) -> dict[str, int]:
  """Applies ``plan`` to ``staging``'s slices and to ``totals`` (the run's
  counters, changed in place).

  Returns:
    {patient_id: slices dropped} (empty unless --drop-duplicates).
  """
  if not (plan.flags or plan.drop or plan.moves):
    return {}
  patients = plan.touches()
  folder = stores.join(staging, schema.SLICES_DIR)
  manifest_path = stores.join(folder, digests.MANIFEST_FILE)
  manifest = json.loads(stores.read_bytes(manifest_path))
  counts: collections.Counter = collections.Counter()
  for old, new in plan.moves.values():
    counts[metrics.split_patients_counter(old)] -= 1
    counts[metrics.split_patients_counter(new)] += 1
  dropped: collections.Counter = collections.Counter()
  # on an object store a shard is still the sink's object (SOURCE)
  shards = {
    name: manifest[name].get(digests.SOURCE) or stores.join(folder, name)
    for name in sorted(manifest)
  }
  touched = [name for name, shard in shards.items() if _holds(shard, patients)]
  if touched:  # else the plan changes only kept rows (incremental.carry_over)
    _LOG.info('%s', _applying_line(plan, len(touched), len(shards)))
  for name in touched:
    shard = shards[name]
    manifest[name].update(
      rewrite(
        shard,
        shard + '.rewritten',
        lambda table: changed(table, plan, counts, dropped),
        image_codec,
      )
    )
    stores.move_all([(shard + '.rewritten', shard)])
  stores.write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())
  for key, n in counts.items():
    totals[key] = totals.get(key, 0) + n
  return dict(dropped)


def _holds(shard: str, patients: set[str]) -> bool:
  """Whether ``shard`` holds a row of one of ``patients``."""
  with stores.readable(shard) as f:
    ids = pq.read_table(f, columns=['patient_id'])['patient_id']
  return bool(set(pc.unique(ids).to_pylist()) & patients)


def _applying_line(plan: Plan, touched: int, shards: int) -> str:
  """The console line that says what happens after the job: ``applying the
  duplicate plan (18 slices flagged, 0 dropped, 1 patient moved): rewriting
  4 of 12 staged slice files``."""
  moved = len(plan.moves)
  return (
    f'applying the duplicate plan ({len(plan.flags)} slices flagged, '
    f'{len(plan.drop)} dropped, {moved} patient{"" if moved == 1 else "s"} '
    f'moved): rewriting {touched} of {shards} staged slice files'
  )


def rewrite(
  source: str,
  target: str,
  change: Callable[[pa.Table], pa.Table],
  image_codec: str,
) -> dict:
  """Writes ``source``'s rows, each row group through ``change``, to
  ``target`` with the writer's Parquet options; returns ``target``'s
  manifest entry."""
  with stores.readable(source) as f:
    parquet = pq.ParquetFile(f, page_checksum_verification=True)
    groups = (change(parquet.read_row_group(g)) for g in range(parquet.num_row_groups))
    return write_file(target, groups, schema.SLICE_SCHEMA, image_codec)


def write_file(
  target: str, tables: Iterable[pa.Table], arrow_schema: pa.Schema, image_codec=None
) -> dict:
  """Writes ``tables`` (a row group each, empty ones left out) to ``target``
  with the writer's Parquet options; returns its manifest entry (size,
  digest, Delta statistics)."""
  sink = stores.store(target).create(target)
  writer = pq.ParquetWriter(
    sink, arrow_schema, **writer_options(arrow_schema, image_codec)
  )
  for table in tables:
    if table.num_rows:
      writer.write_table(table)
  writer.close()
  sink.close()
  stats = filestats.of_footer(writer.writer.metadata)
  with stores.readable(target) as f:
    size, digest = digests.of_stream(f)
  return digests.entry(size, digest, stats)


def changed(
  table: pa.Table,
  plan: Plan,
  counts: collections.Counter,
  dropped: collections.Counter,
) -> pa.Table:
  """``table`` with ``plan`` applied; ``counts`` gathers the counter changes
  and ``dropped`` the rows dropped per patient."""
  rows = table.select(
    ['patient_id', 'slice_index', 'split', 'qa_flags', 'i_mask', 'o_mask']
  ).to_pylist()
  keep, splits, qa = [], [], []
  for row in rows:
    key = (row['patient_id'], row['slice_index'])
    split = row['split']
    if key in plan.drop:
      keep.append(False)
      dropped[row['patient_id']] += 1
      _count_dropped(row, counts)
      continue
    keep.append(True)
    if row['patient_id'] in plan.moves:
      new = plan.moves[row['patient_id']][1]
      counts[metrics.split_slices_counter(split)] -= 1
      counts[metrics.split_slices_counter(new)] += 1
      split = new
    added = [f for f in plan.flags.get(key, []) if f not in row['qa_flags']]
    for flag in added:
      counts[metrics.qa_counter(flag)] += 1
    splits.append(split)
    qa.append(row['qa_flags'] + added)
  table = table.filter(pa.array(keep, pa.bool_()))
  return with_columns(table, split=splits, qa_flags=qa)


def with_columns(table: pa.Table, **values: list) -> pa.Table:
  """``table`` with the named slice columns replaced by ``values``."""
  for name, column in values.items():
    field = schema.SLICE_SCHEMA.field(name)
    index = table.schema.get_field_index(name)
    table = table.set_column(index, field, pa.array(column, type=field.type))
  return table


def _count_dropped(row: dict, counts: collections.Counter) -> None:
  counts[metrics.SLICES_WRITTEN] -= 1
  counts[metrics.split_slices_counter(row['split'])] -= 1
  for kind, name in metrics.MASKS_WRITTEN.items():
    counts[name] -= row[f'{kind}_mask'] is not None
  for flag in row['qa_flags']:
    counts[metrics.qa_counter(flag)] -= 1
