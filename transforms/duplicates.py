"""Duplicates: the same image or the same contour file in two places.

The decode stage emits, per chunk, the identity of every slice it wrote (SOP
Instance UID, pixel hash, split) and of every contour file it read (a hash of
its bytes). ``FindDuplicates`` groups them by identity, joins groups that
share a slice (the same file copied under two patients matches by UID and by
pixels: one group), and returns one reconciliation row per group
(``duplicate_slice``, ``duplicate_contour``) naming every path, plus a plan:
which rows get which quality flag, which copies ``--drop-duplicates`` drops
(all but the first by path), and which patients change split so that no two
copies of one image end up in different splits. The rows are already
written by then: the launcher applies the plan to the few shards it touches
(``beam_pipeline.launch.duplicate_plan``).

A constant image (every pixel the same value, e.g. an empty slice) is not
matched by its pixels: identical blank slices are not copies.
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import xxhash
from apache_beam import pvalue

from transforms import _bundles
from transforms.contract import packing, schema, splits
from transforms.io import stores

SLICE_FLAG = schema.DUPLICATE_SLICE
CONTOUR_FLAG = schema.DUPLICATE_CONTOUR

# The identity records come from the decode stage: see layout.slice_identity.


def _keys(identities: tuple) -> Iterator[tuple]:
  slices, contours = identities
  for pid, original, index, path, split, uid, pixels in slices:
    member = (path, pid, original, index, split)
    if uid:
      yield ('slice', 'the same SOP Instance UID', uid), member
    if pixels:
      yield ('slice', 'identical pixels', pixels), member
  for pid, original, index, kind, path, digest in contours:
    yield ('contour', 'identical bytes', digest), (path, pid, original, index, kind)


# Identities travel in a few buckets per chunk, not one element per key: a
# shuffle of one element per slice and key cost a run a tenth of its CPU
# (BENCHMARKS.md, "Figures behind the code").
BUCKETS = 16


def _bucketed(identities: tuple) -> Iterator[tuple[int, bytes]]:
  """(bucket, packed [(key hash, kind, reason, member)]) for one chunk's
  identities: the shuffle holds one bytes value per chunk and bucket
  (``packing``), not a record per slice."""
  buckets: dict[int, list] = {}
  for (kind, reason, value), member in _keys(identities):
    h = xxhash.xxh3_64_intdigest(f'{kind}|{reason}|{value}'.encode())
    buckets.setdefault(h % BUCKETS, []).append((h, kind, reason, member))
  for bucket, batch in buckets.items():
    yield bucket, packing.pack(batch)


def _repeated(element) -> Iterator[tuple]:
  """(kind, reason, members) for each key of a bucket held by two or more
  inputs."""
  _, batches = element
  seen: dict[tuple, list] = {}
  for batch in batches:
    for h, kind, reason, member in packing.unpack(batch):
      seen.setdefault((h, kind, reason), []).append(member)
  for (_, kind, reason), members in seen.items():
    if len(members) > 1 and len(distinct := sorted(set(members))) > 1:
      yield kind, reason, tuple(distinct)


class _Components:
  """Union-find over hashable items."""

  def __init__(self):
    self._parent: dict = {}

  def find(self, item):
    self._parent.setdefault(item, item)
    while self._parent[item] != item:
      self._parent[item] = self._parent[self._parent[item]]
      item = self._parent[item]
    return item

  def join(self, items) -> None:
    first, *others = items
    for item in others:
      self._parent[self.find(item)] = self.find(first)

  def groups(self) -> list[list]:
    by_root: dict = {}
    for item in self._parent:
      by_root.setdefault(self.find(item), []).append(item)
    return sorted(sorted(g) for g in by_root.values())


def plan(groups: list[tuple], drop: bool) -> tuple[list[dict], dict]:
  """Reconciliation rows and the plan for the launcher, from the repeated
  identities (pure: tests call it directly).

  Returns:
    (rows, plan) where plan is {'flags': [[patient_id, slice_index, flag]],
    'drop': [[patient_id, slice_index]], 'moves': {patient_id: [from, to]}}.
  """
  rows: list[dict] = []
  flags: set[tuple] = set()
  dropped: list[list] = []
  reasons: dict[tuple, set[str]] = {}
  moves = {} if drop else _split_moves([g for g in groups if g[0] == 'slice'])
  for kind in ('slice', 'contour'):
    components = _Components()
    for group_kind, reason, members in groups:
      if group_kind == kind:
        components.join(members)
        for member in members:
          reasons.setdefault(member, set()).add(reason)
    for members in components.groups():
      if kind == 'contour':
        rows.append(_contour_row(members, reasons))
        flags |= {(m[1], m[3], CONTOUR_FLAG) for m in members}
        continue
      rows.append(_slice_row(members, reasons, drop, moves))
      if drop:
        dropped += [[m[1], m[3]] for m in members[1:]]
        flags.add((members[0][1], members[0][3], SLICE_FLAG))
      else:
        flags |= {(m[1], m[3], SLICE_FLAG) for m in members}
  gone = {tuple(d) for d in dropped}
  return rows, {
    'flags': sorted([*f] for f in flags if f[:2] not in gone),
    'drop': sorted(dropped),
    'moves': moves,
  }


def _slice_row(members: list, reasons: dict, drop: bool, moves: dict) -> dict:
  why = sorted(set().union(*(reasons[m] for m in members)))
  paths = ', '.join(m[0] for m in members)
  done = (
    f'kept {members[0][0]}, dropped the other copies (--drop-duplicates)'
    if drop
    else f'all written, flagged {SLICE_FLAG}'
  )
  moved = sorted({m[1] for m in members if m[1] in moves})
  done += ''.join(
    f'; patient {p} moved from split {moves[p][0]} to {moves[p][1]}' for p in moved
  )
  return schema.reconciliation_row(
    members[0][1],
    members[0][2],
    schema.DUPLICATE_SLICE,
    f'{len(members)} copies of one image ({" and ".join(why)}): {paths}; {done}',
  )


def _contour_row(members: list, reasons: dict) -> dict:
  paths = ', '.join(m[0] for m in members)
  return schema.reconciliation_row(
    members[0][1],
    members[0][2],
    schema.DUPLICATE_CONTOUR,
    f'{len(members)} identical contour files: {paths}; the slices they belong '
    f'to are flagged {CONTOUR_FLAG}',
  )


def _split_moves(slice_groups: list[tuple]) -> dict[str, list[str]]:
  """{patient_id: [its split, the new one]} for the patients that must
  change split so that every copy of an image lies in one split: patients
  sharing an image join the first of their splits in train, val, test
  order. The rule looks at the splits only, never at the ids, so
  pseudonymised ids move the same patients as ids as written."""
  patients = _Components()
  split_of: dict[str, str] = {}
  for _, _, members in slice_groups:
    patients.join([m[1] for m in members])
    split_of.update({m[1]: m[4] for m in members})
  moves = {}
  for group in patients.groups():
    target = min((split_of[p] for p in group), key=splits.SPLITS.index)
    moves.update({p: [split_of[p], target] for p in group if split_of[p] != target})
  return moves


class FindDuplicates(beam.PTransform):
  """Identity records (per chunk) -> reconciliation rows of duplicates; the
  plan is written to ``plan_path`` (JSON) for the launcher."""

  def __init__(
    self, plan_path: str, drop: bool, config: stores.StoreConfig | None = None
  ):
    super().__init__()
    self._plan_path = plan_path
    self._drop = drop
    self._config = config or stores.StoreConfig()

  def expand(self, identities):
    drop = self._drop

    def rows_and_plan(groups):
      rows, launcher_plan = plan(groups, drop)
      yield from rows
      yield pvalue.TaggedOutput('plan', launcher_plan)

    outputs = (
      identities
      | 'Buckets' >> beam.FlatMap(_bucketed).with_output_types(tuple[int, bytes])
      | 'ByBucket' >> beam.GroupByKey()
      | 'Repeated' >> beam.FlatMap(_repeated)
      | 'Together' >> beam.combiners.ToList()
      | 'Plan' >> beam.FlatMap(rows_and_plan).with_outputs('plan', main='rows')
    )
    _ = outputs.plan | 'WritePlan' >> beam.ParDo(
      _bundles.WriteJsonFn(self._plan_path, self._config)
    )
    return outputs.rows
