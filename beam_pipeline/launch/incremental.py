"""Incremental runs, the launcher's side: where a run starts, and the kept
patients' rows carried into the new version.

A run into an existing dataset decodes only the patients whose inputs
changed since the version it starts from (``transforms.incremental`` sets the
others aside). Once the job is done, ``carry_over`` makes the new version
whole: the start version's slice files that hold only kept patients, whose
rows the duplicate plan leaves as they are, stay in the table untouched;
every other file of it is removed from the new version, its kept patients'
rows first rewritten into a file of this run (with the plan applied, as a
full run would write them). The kept patients' error rows of the decode stage
are carried into the new errors table, and their rows counted, so the run
record describes the whole version.

A run decodes every patient (``Start.why_full`` says why) when there is no
version yet, with ``--full``, when the version was made from another input
or by a run before fingerprints were recorded, when an option that changes
rows differs from the version's, and with ``--id-map`` (the map of a version
needs every patient's identifiers).

Splits follow the dataset's history whether the run is incremental or full:
the start version's patients keep the split they had (``stage_pinned``,
``transforms.contract.splits``) when it was made with the same fractions.
"""

from __future__ import annotations

import collections
import json
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from beam_pipeline.launch import duplicate_plan
from beam_pipeline.launch.duplicate_plan import Plan
from transforms.assign import PINNED_FILE
from transforms.contract import digests, metrics, schema
from transforms.incremental import INPUTS_FILE, PREVIOUS_FILE
from transforms.io import stores

# The record's keys: every matched patient's input fingerprint, the digest
# of the options that change rows, and what the run did to the patients.
INPUTS = 'inputs'
SETTINGS = 'settings_xxh3'
PATIENTS = 'patients'
# Every matched patient's split before duplicate moves, and the fractions.
SPLITS = 'splits'
FRACTIONS = 'split_fractions'
_DUPLICATE_FLAGS = (schema.DUPLICATE_SLICE, schema.DUPLICATE_CONTOUR)
# The error rows the decode stage makes (the listing's and searches' are
# made again by every run).
_DECODE_STAGES = (
  schema.STAGE_FETCH,
  schema.STAGE_READ,
  schema.STAGE_DECODE,
  schema.STAGE_CONTOUR,
  schema.STAGE_EXCLUDED,
)
_COUNTED = ['patient_id', 'slice_index', 'split', 'qa_flags']
_KEPT_NAME = 'part-kept-{:05d}.parquet'


class Start(NamedTuple):
  """The version a run starts from, and whether the run is incremental.

  Attributes:
    version: the slices table's version (None: there is none).
    record: that version's run record (None: no version).
    previous: {patient_id: fingerprint} the job compares with (empty for a
      full run).
    why_full: why every patient is decoded ('' for an incremental run).
    committed: when the version was committed (ms since the epoch).
  """

  version: int | None
  record: dict | None
  previous: dict[str, str]
  why_full: str
  committed: int | None = None

  @property
  def incremental(self) -> bool:
    return not self.why_full


def settings_digest(settings: dict) -> str:
  """The digest of the options that change rows (``settings``: JSON-able)."""
  text = json.dumps({**settings, 'schema': schema.SCHEMA_VERSION}, sort_keys=True)
  return xxhash.xxh3_64_hexdigest(text.encode())


# Error rows of a failure that may not happen again (an I/O error, a PACS
# retrieve, a decoder that timed out, crashed or ran out of memory): a full
# run would try again, so the patient is decoded again rather than kept.
_TRANSIENT_STAGES = (schema.STAGE_FETCH, schema.STAGE_READ)
_TRANSIENT_DECODE = ('decoder timed out', 'decoder process crashed', 'MemoryError')


def to_retry(output: str, record: dict | None) -> set[str]:
  """The patients of the version of ``record`` with an error row of a
  failure that may not happen again."""
  if record is None or digests.FILES not in record:
    return set()
  found = set()
  for table in _tables(output, record, schema.ERRORS_DIR):
    for row in table.select(['patient_id', 'stage', 'error']).to_pylist():
      transient = row['stage'] in _TRANSIENT_STAGES or (
        row['stage'] == schema.STAGE_DECODE
        and any(mark in row['error'] for mark in _TRANSIENT_DECODE)
      )
      if transient and row['patient_id']:
        found.add(row['patient_id'])
  return found


def _tables(output: str, record: dict, folder: str) -> list[pa.Table]:
  """The files of ``folder`` (a table) in the version of ``record``."""
  tables = []
  for relative in sorted(record[digests.FILES]):
    if relative.startswith(folder + '/'):
      with stores.readable(stores.join(output, relative)) as f:
        tables.append(pq.read_table(f))
  return tables


def begin(
  version: int | None,
  record: dict | None,
  committed: int | None,
  input_root: str,
  settings: str,
  full: bool,
  id_map: bool,
  retry: frozenset[str] = frozenset(),
) -> Start:
  """Where a run starts, and whether it is incremental.

  Args:
    version, record, committed: the slices version the run starts from,
      its record and when it was committed (publish.start_of).
    input_root: this run's --input.
    settings: this run's settings_digest.
    full: --full.
    id_map: whether --id-map is given.
    retry: patients decoded again whatever their fingerprint (to_retry).
  """
  if version is None or record is None:
    why = 'the first version'
  elif full:
    why = '--full'
  elif id_map:
    why = '--id-map needs every patient decoded'
  elif record.get('input') != input_root:
    why = f'version {version} was made from another input'
  elif INPUTS not in record:
    why = f'version {version} has no input fingerprints (an older run)'
  elif record.get(SETTINGS) != settings:
    why = f'options that change rows differ from version {version}'
  else:
    why = ''
  if why:
    return Start(version, record, {}, why, committed)
  again = set(record.get('dropped_duplicates') or {}) | retry
  previous = {pid: fp for pid, fp in record[INPUTS].items() if pid not in again}
  return Start(version, record, previous, '', committed)


def stage_previous(staging: str, start: Start) -> str | None:
  """Writes the fingerprints the job compares with into ``staging``;
  returns the file (None for a full run)."""
  if not start.incremental:
    return None
  path = stores.join(staging, PREVIOUS_FILE)
  stores.write_bytes(path, json.dumps(start.previous, sort_keys=True).encode())
  return path


def stage_pinned(
  staging: str, start: Start, fractions: tuple[float, float, float]
) -> str | None:
  """Writes the splits the start version's patients keep into ``staging``
  (a PINNED_FILE); returns it, or None when none keeps one (no version, or
  one made with other fractions). Patients are matched by patient_id, from
  whatever input (a tree moved or re-mounted keeps its splits). A version
  recorded before splits were: its patients keep their hash split."""
  record = start.record
  if record is None:
    return None
  if SPLITS in record:
    if record.get(FRACTIONS) != list(fractions):
      return None
    pinned = {'pinned': record[SPLITS]}
  else:
    pinned = {'hashed': sorted(record.get(INPUTS) or ())}
  path = stores.join(staging, PINNED_FILE)
  stores.write_bytes(path, json.dumps(pinned, sort_keys=True).encode())
  return path


def old_slice_files(output: str, start: Start) -> tuple[str, ...]:
  """The start version's slice files (none for a full run)."""
  if not start.incremental:
    return ()
  prefix = schema.SLICES_DIR + '/'
  return tuple(
    stores.join(output, path)
    for path in sorted(start.record[digests.FILES])
    if path.startswith(prefix)
  )


class Carried(NamedTuple):
  """What the new version takes from the start version.

  Attributes:
    fingerprints: {patient_id: fingerprint} of every matched patient.
    splits: {patient_id: split before duplicate moves} of each of them.
    kept_files: {path: record entry} of the start version's slice files the
      new version keeps as they are.
    removed: {path: bytes} of the start version's slice files the new
      version drops.
    staged: {path: manifest entry} of the files written here (the kept rows
      of rewritten files, the kept patients' error rows), relative to the
      output, in the staging folder.
    patients: {added, replaced, removed, kept} counts.
    dropped: {patient_id: kept slices the plan drops}.
  """

  fingerprints: dict[str, str]
  splits: dict[str, str]
  kept_files: dict[str, dict]
  removed: dict[str, int]
  staged: dict[str, dict]
  patients: dict[str, int]
  dropped: dict[str, int]


def carry_over(
  output: str,
  staging: str,
  start: Start,
  plan: Plan,
  image_codec: str,
  totals: dict[str, int],
) -> Carried:
  """Makes the new version whole from the start version (see the module
  docstring); adds the kept rows' counts to ``totals``."""
  path = stores.join(staging, INPUTS_FILE)
  inputs = json.loads(stores.read_bytes(path))
  stores.store(path).delete([path])
  fingerprints = {pid: found[0] for pid, found in inputs.items()}
  splits = {pid: found[1] for pid, found in inputs.items()}
  before = set((start.record or {}).get(INPUTS) or {})
  kept = {
    pid for pid, fp in fingerprints.items() if fp and start.previous.get(pid) == fp
  }
  patients = {
    'added': len(set(fingerprints) - before),
    'replaced': len((set(fingerprints) & before) - kept),
    'removed': len(before - set(fingerprints)),
    'kept': len(kept),
  }
  if not start.incremental:
    return Carried(fingerprints, splits, {}, {}, {}, patients, {})
  counts: collections.Counter = collections.Counter()
  dropped: collections.Counter = collections.Counter()
  kept_files, removed, staged = {}, {}, {}
  for relative in (p[len(output) + 1 :] for p in old_slice_files(output, start)):
    source = stores.join(output, relative)
    table = _columns(source)
    if not _rewritten(table, kept, splits, plan):
      kept_files[relative] = start.record[digests.FILES][relative]
      _count(table, counts)
      continue
    removed[relative] = start.record[digests.FILES][relative]['bytes']
    if not set(pc.unique(table['patient_id']).to_pylist()) & kept:
      continue
    name = f'{schema.SLICES_DIR}/{_KEPT_NAME.format(len(staged))}'
    staged[name] = duplicate_plan.rewrite(
      source,
      stores.join(staging, name),
      lambda table: _kept_rows(table, kept, splits, plan, dropped),
      image_codec,
    )
  for name in staged:
    _count(_columns(stores.join(staging, name)), counts)
  counted = [pid for pid in kept if inputs[pid][2]]
  for pid in counted:
    counts[metrics.split_patients_counter(splits[pid])] += 1
  counts[metrics.PATIENTS_DONE] += len(counted)
  staged.update(_carry_errors(output, staging, start, kept, counts))
  for key, n in counts.items():
    totals[key] = totals.get(key, 0) + n
  return Carried(
    fingerprints, splits, kept_files, removed, staged, patients, dict(dropped)
  )


def without_empty(files: dict[str, dict]) -> dict[str, dict]:
  """``files`` (staged, take_manifests) without slice files of no rows: an
  incremental run that decoded nothing adds no file."""
  prefix = schema.SLICES_DIR + '/'
  return {
    path: entry
    for path, entry in files.items()
    if not path.startswith(prefix)
    or json.loads(entry.get(digests.STATS) or '{}').get('numRecords') != 0
  }


def _wanted(row: dict, splits: dict, plan: Plan) -> tuple[str, list[str]]:
  """A kept row's split and flags as a full run writes them: the flags of
  its decoding (its duplicate flags are the old plan's), then the plan's."""
  pid, key = row['patient_id'], (row['patient_id'], row['slice_index'])
  split = plan.moves[pid][1] if pid in plan.moves else splits[pid]
  own = [f for f in row['qa_flags'] if f not in _DUPLICATE_FLAGS]
  return split, own + [f for f in plan.flags.get(key, []) if f not in own]


def _rewritten(table: pa.Table, kept: set, splits: dict, plan: Plan) -> bool:
  """Whether a slice file (``_columns``) leaves the version: it holds a
  patient not kept, or a row the plan drops or changes."""
  patients = set(pc.unique(table['patient_id']).to_pylist())
  if not patients <= kept:
    return True
  if patients & plan.touches():
    for row in table.select(_COUNTED).to_pylist():
      if (row['patient_id'], row['slice_index']) in plan.drop:
        return True
      if _wanted(row, splits, plan) != (row['split'], row['qa_flags']):
        return True
    return False
  # the plan leaves these patients alone: a row changes only if it has an
  # old plan's flag or split
  flags = pc.list_flatten(table['qa_flags'])
  if pc.any(pc.is_in(flags, pa.array(_DUPLICATE_FLAGS, pa.string()))).as_py():
    return True
  pairs = table.group_by(['patient_id', 'split']).aggregate([])
  return any(
    splits[pid] != split
    for pid, split in zip(
      pairs['patient_id'].to_pylist(), pairs['split'].to_pylist(), strict=True
    )
  )


def _kept_rows(
  table: pa.Table, kept: set, splits: dict, plan: Plan, dropped: collections.Counter
) -> pa.Table:
  """A row group's kept rows, as a full run writes them."""
  keep = pc.is_in(table['patient_id'], pa.array(sorted(kept), pa.string()))
  table = table.filter(keep)
  rows = table.select(_COUNTED).to_pylist()
  wanted = [_wanted(row, splits, plan) for row in rows]
  gone = [(r['patient_id'], r['slice_index']) in plan.drop for r in rows]
  for row, out in zip(rows, gone, strict=True):
    if out:
      dropped[row['patient_id']] += 1
  table = duplicate_plan.with_columns(
    table, split=[w[0] for w in wanted], qa_flags=[w[1] for w in wanted]
  )
  return table.filter(pa.array([not g for g in gone], pa.bool_()))


def _columns(path: str) -> pa.Table:
  """The columns of a slice file that carry_over reads (a mask's pixel
  count stands for the mask: one is set whenever the other is)."""
  with stores.readable(path) as f:
    return pq.read_table(f, columns=[*_COUNTED, 'i_mask_pixels', 'o_mask_pixels'])


def _count(table: pa.Table, counts: collections.Counter) -> None:
  """Adds the rows of one slice file (``_columns``) to ``counts``, as the
  decode stage counts them."""
  counts[metrics.SLICES_WRITTEN] += table.num_rows
  for split, n in _value_counts(table['split']):
    counts[metrics.split_slices_counter(split)] += n
  for kind, name in metrics.MASKS_WRITTEN.items():
    counts[name] += table.num_rows - table[f'{kind}_mask_pixels'].null_count
  for flag, n in _value_counts(pc.list_flatten(table['qa_flags'])):
    counts[metrics.qa_counter(flag)] += n


def _value_counts(values) -> list[tuple[str, int]]:
  found = pc.value_counts(values)
  return list(
    zip(
      found.field('values').to_pylist(), found.field('counts').to_pylist(), strict=True
    )
  )


def _carry_errors(
  output: str, staging: str, start: Start, kept: set, counts: collections.Counter
) -> dict[str, dict]:
  """The kept patients' decode-stage error rows of the start version, as one
  staged errors file ({} when there are none)."""
  found = _tables(output, start.record, schema.ERRORS_DIR)
  tables = [table.cast(schema.ERROR_SCHEMA) for table in found]
  if not tables:
    return {}
  errors = pa.concat_tables(tables)
  mine = pc.and_(
    pc.is_in(errors['patient_id'], pa.array(sorted(kept), pa.string())),
    pc.is_in(errors['stage'], pa.array(_DECODE_STAGES, pa.string())),
  )
  errors = errors.filter(mine)
  if not errors.num_rows:
    return {}
  for stage, n in collections.Counter(errors['stage'].to_pylist()).items():
    counts[metrics.error_counter(stage)] += n
  name = f'{schema.ERRORS_DIR}/{_KEPT_NAME.format(0)}'
  target = stores.join(staging, name)
  return {name: duplicate_plan.write_file(target, [errors], schema.ERROR_SCHEMA)}
