"""A patient's slices assembled into volumes (phase, z, rows, columns).

    for volume in volumes('output', 'SCD0000101', labels=True, ignore=3):
        if volume.problems:             # never stacked: volume.image is None
            print(volume.problems)
            continue
        volume.image                    # float32 (phase, z, rows, columns)
        volume.affine                   # LPS, for the index (z, row, column)

The rules (docs/VOLUMES.md explains them):

- **Series.** A patient's slices are grouped by ``series_instance_uid`` (the
  slices without one form a series of their own); ``Volume.series`` ranks a
  patient's series by their smallest ``slice_index`` (before any slice is
  excluded), so the rank does not change when the UIDs are pseudonymised.
- **Locations.** Within a series, a slice's location is its
  ``image_position_patient`` projected on the slice normal (row cosine x
  column cosine); positions within ``SAME_POSITION_MM`` along it are one
  location. Locations are sorted along the normal: z = 0 is the lowest.
- **Phases.** At each location the slices are sorted by ``trigger_time``
  (then ``instance_number``, then ``slice_index``); phase k is the k-th at
  every location, so a phase's trigger times may differ a little between
  locations (``Volume.trigger_time``, shape (phase, z)). A series without
  trigger times has one phase: one slice per location.
- **Checks.** Missing or malformed geometry, colour images, mixed
  orientations, pixel spacings or image sizes, positions off the stack's
  axis, trigger times on some slices only, two slices at one location and
  trigger time, unequal phase counts per location, uneven gaps and gaps that
  are a multiple of the usual one (missing slices) are each a problem on the
  Volume, which is then not stacked (its arrays are None).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beam_pipeline.dataset import geometry, reader
from beam_pipeline.dataset.labels import check_flags, label_map, without_flags

# Positions of one location differ by at most this along the normal, and a
# slice's in-plane offset from the stack's axis by at most this (mm).
SAME_POSITION_MM = 1e-2
# A gap is even when it is within GAP_RELATIVE of the usual gap plus
# GAP_ABSOLUTE_MM of it.
GAP_RELATIVE = 1e-3
GAP_ABSOLUTE_MM = 1e-3
# Orientations agree when no cosine differs by more than this; pixel
# spacings when they agree within this fraction.
COSINE_TOLERANCE = 1e-4
SPACING_RELATIVE = 1e-4
# Two slices of one location are one phase twice when their trigger times
# differ by at most this (ms).
SAME_TRIGGER_MS = 1e-2

# The columns assembly reads: geometry and ordering, and the pixels.
LAYOUT_COLUMNS = (
  'patient_id',
  'split',
  'slice_index',
  'series_instance_uid',
  'instance_number',
  'rows',
  'columns',
  'samples_per_pixel',
  'pixel_dtype',
  'pixel_spacing',
  'slice_thickness',
  'image_position_patient',
  'image_orientation_patient',
  'trigger_time',
  'qa_flags',
)
PIXEL_COLUMNS = ('rescale_slope', 'rescale_intercept', 'image', 'i_mask', 'o_mask')

# How many slice numbers a problem names before "and N more".
_NAMED = 5


@dataclasses.dataclass(frozen=True, eq=False)
class Volume:
  """One series of one patient, stacked by phase and location.

  When ``problems`` is not empty the series could not be stacked safely and
  every array below is None (``slices`` still names its slices). With
  ``stack=False`` the geometry fields are set but not the pixel arrays. Arrays
  shaped (phase, z, ...) follow the rules of the module docstring.

  Attributes:
    patient_id: as in the slice table (a pseudonym when the run had a key).
    split: the patient's split.
    series: the rank of the series in the patient, from 0.
    series_instance_uid: the series' UID as in the table (None when absent).
    slices: the ``slice_index`` of every slice of the series, ascending.
    problems: why the series was not stacked, one sentence each.
    slice_index: int32 (phase, z).
    trigger_time: float64 (phase, z), ms; NaN in a series without them.
    qa_flags: object (phase, z), each a tuple of flag names.
    location: float64 (z,): mm along the normal, ascending.
    affine: 4x4 LPS affine for the index (z, row, column).
    spacing: (gap between locations, row spacing, column spacing) in mm; the
      gap of a single location is its slice thickness (1 mm when unknown).
    image: (phase, z, rows, columns), rescaled unless asked not to.
    i_mask, o_mask: bool (phase, z, rows, columns), False where absent.
    has_i_mask, has_o_mask: bool (phase, z).
    labels: uint8 (phase, z, rows, columns) from ``labels.label_map``, when
      asked for.
  """

  patient_id: str
  split: str
  series: int
  series_instance_uid: str | None
  slices: tuple[int, ...]
  problems: tuple[str, ...] = ()
  slice_index: np.ndarray | None = None
  trigger_time: np.ndarray | None = None
  qa_flags: np.ndarray | None = None
  location: np.ndarray | None = None
  affine: np.ndarray | None = None
  spacing: tuple[float, float, float] | None = None
  image: np.ndarray | None = None
  i_mask: np.ndarray | None = None
  o_mask: np.ndarray | None = None
  has_i_mask: np.ndarray | None = None
  has_o_mask: np.ndarray | None = None
  labels: np.ndarray | None = None

  @property
  def ras_affine(self) -> np.ndarray | None:
    """``affine`` in RAS (NIfTI's and MONAI's frame), same index order."""
    return None if self.affine is None else geometry.to_ras(self.affine)

  @property
  def phases(self) -> int:
    """Phases stacked (0 when not stacked)."""
    return 0 if self.slice_index is None else self.slice_index.shape[0]

  def labeled(self, phase: int | None = None) -> bool:
    """Whether any slice (of ``phase``, or of any phase) has a mask."""
    if self.has_i_mask is None:
      return False
    rows = slice(None) if phase is None else phase
    return bool(self.has_i_mask[rows].any() or self.has_o_mask[rows].any())


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where each slice of a series goes: ``grid`` holds row numbers."""

  grid: np.ndarray  # (phase, z) of row numbers into the series' rows
  location: np.ndarray  # (z,)
  affine: np.ndarray
  spacing: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class _Options:
  stack: bool = True
  rescale: bool = True
  dtype: np.dtype | type | None = np.float32
  labels: bool = False
  ignore: int | None = None


# A slice table without rows, for checking flag names before any read.


def volumes(
  output: str,
  patient_id: str | Iterable[str] | None = None,
  *,
  version: int | None = None,
  exclude_flags: Iterable[str] = (),
  stack: bool = True,
  rescale: bool = True,
  dtype: np.dtype | type | None = np.float32,
  labels: bool = False,
  ignore: int | None = None,
) -> Iterator[Volume]:
  """The volumes of a version of a pipeline output, patient by patient.

  Each patient's rows are read with one filtered scan; its series are
  yielded in rank order. Arguments are checked, and the dataset against its
  run record, before the first volume is read.

  Args:
    output: a pipeline output folder.
    patient_id: one patient, several, or None for every patient (in
      ``patient_id`` order).
    version: the dataset version (default: the latest).
    exclude_flags: quality flags whose slices are dropped before stacking;
      a dropped slice inside a stack is then a missing slice (a problem).
    stack: False to only group and check (``problems``, ``slices``,
      ``slice_index``, ``trigger_time``, ``location``, ``affine``...):
      pixels and masks are not read and the pixel arrays stay None.
    rescale: apply ``rescale_slope`` and ``rescale_intercept``.
    dtype: of ``image``; None keeps the stored dtype (float64 when
      rescaled).
    labels: also compute ``Volume.labels`` (``labels.label_map``).
    ignore: the label of pixels the drawn contours do not decide (see
      ``labels``), e.g. 3 for nnU-Net; None counts an absent contour as empty.

  Returns:
    An iterator of Volumes, each series of each patient, with or without
    problems.

  Raises:
    ValueError: an ``exclude_flags`` name that is not a quality flag.
    FileNotFoundError, DatasetError: see ``reader.open_dataset``.
  """
  columns = list(LAYOUT_COLUMNS + (PIXEL_COLUMNS if stack else ()))
  flags = check_flags(exclude_flags)
  dataset = reader.open_dataset(output, version)
  if patient_id is None:
    ids = _patient_ids(dataset)
  elif isinstance(patient_id, str):
    ids = [patient_id]
  else:
    ids = list(patient_id)
  options = _Options(stack, rescale, dtype, labels, ignore)

  def each() -> Iterator[Volume]:
    for pid in ids:
      table = dataset.to_table(filter=pc.field('patient_id') == pid, columns=columns)
      yield from _assemble(table, options, without_flags(table, flags))

  return each()


def patient_ids(output: str, version: int | None = None) -> list[str]:
  """Every patient_id of a version (default: the latest), sorted.

  Raises:
    FileNotFoundError, DatasetError: see ``reader.open_dataset``.
  """
  return _patient_ids(reader.open_dataset(output, version))


def _patient_ids(dataset) -> list[str]:
  return sorted(pc.unique(dataset.to_table(columns=['patient_id'])[0]).to_pylist())


def assemble(
  table: pa.Table,
  *,
  exclude_flags: Iterable[str] = (),
  stack: bool = True,
  rescale: bool = True,
  dtype: np.dtype | type | None = np.float32,
  labels: bool = False,
  ignore: int | None = None,
) -> list[Volume]:
  """The volumes of the slice rows in ``table`` (any patients), by the
  rules of the module docstring: what ``volumes`` yields, for rows read by
  other means. ``table`` holds at least LAYOUT_COLUMNS, and
  PIXEL_COLUMNS when ``stack``; the arguments are those of ``volumes``.

  Raises:
    ValueError: an ``exclude_flags`` name that is not a quality flag.
  """
  options = _Options(stack, rescale, dtype, labels, ignore)
  return list(_assemble(table, options, without_flags(table, exclude_flags)))


def _assemble(
  table: pa.Table, options: _Options, keep: pa.Array | None = None
) -> Iterator[Volume]:
  """The volumes of ``table``'s rows; ``keep``: the rows to stack (the
  series are ranked with every row, so dropping rows never renumbers
  them)."""
  kept = [True] * table.num_rows if keep is None else keep.to_pylist()
  by_patient: dict[str, list[tuple[dict, bool]]] = {}
  for row, stays in zip(table.to_pylist(), kept, strict=True):
    by_patient.setdefault(row['patient_id'], []).append((row, stays))
  for pid in sorted(by_patient):
    for rank, series in enumerate(_series_of(by_patient[pid])):
      rows = [row for row, stays in series if stays]
      if rows:
        yield _volume(rows, rank, options)


def _series_of(rows: list[tuple[dict, bool]]) -> list[list[tuple[dict, bool]]]:
  """A patient's (row, kept) by series, each sorted by slice_index, the
  series in the order of their smallest slice_index."""
  by_uid: dict[str | None, list[tuple[dict, bool]]] = {}
  for item in sorted(rows, key=lambda item: item[0]['slice_index']):
    by_uid.setdefault(item[0]['series_instance_uid'], []).append(item)
  return sorted(by_uid.values(), key=lambda series: series[0][0]['slice_index'])


def _volume(rows: list[dict], rank: int, options: _Options) -> Volume:
  """One series' Volume: stacked, or with its problems."""
  first = rows[0]
  identity = {
    'patient_id': first['patient_id'],
    'split': first['split'],
    'series': rank,
    'series_instance_uid': first['series_instance_uid'],
    'slices': tuple(row['slice_index'] for row in rows),
  }
  layout, problems = _plan(rows)
  if layout is None:
    return Volume(**identity, problems=tuple(problems))
  grid = layout.grid
  qa_flags = np.empty(grid.shape, dtype=object)
  for at, n in np.ndenumerate(grid):
    qa_flags[at] = tuple(rows[n]['qa_flags'] or ())
  fields = {
    **identity,
    'slice_index': np.array(
      [[rows[n]['slice_index'] for n in phase] for phase in grid], np.int32
    ),
    'trigger_time': np.array(
      [[_or_nan(rows[n]['trigger_time']) for n in phase] for phase in grid]
    ),
    'qa_flags': qa_flags,
    'location': layout.location,
    'affine': layout.affine,
    'spacing': layout.spacing,
  }
  if options.stack:
    fields.update(_pixels(rows, grid, options))
  return Volume(**fields)


def _or_nan(value: float | None) -> float:
  return np.nan if value is None else float(value)


def _pixels(rows: list[dict], grid: np.ndarray, options: _Options) -> dict:
  """image, masks and labels of a planned series."""
  shape = (*grid.shape, rows[0]['rows'], rows[0]['columns'])
  dtype = options.dtype
  if dtype is None:
    stored = np.result_type(*{row['pixel_dtype'] for row in rows})
    dtype = np.float64 if options.rescale else stored
  image = np.empty(shape, dtype)
  masks = {kind: np.zeros(shape, bool) for kind in 'io'}
  has = {kind: np.zeros(grid.shape, bool) for kind in 'io'}
  for at, n in np.ndenumerate(grid):
    row = rows[n]
    image[at] = reader.image_of(row, rescale=options.rescale and _rescaled(row))
    for kind in 'io':
      mask = reader.mask_of(row, kind)
      if mask is not None:
        masks[kind][at] = mask
        has[kind][at] = True
  fields = {
    'image': image,
    'i_mask': masks['i'],
    'o_mask': masks['o'],
    'has_i_mask': has['i'],
    'has_o_mask': has['o'],
  }
  if options.labels:
    fields['labels'] = label_map(
      masks['i'], masks['o'], has['i'], has['o'], ignore=options.ignore
    )
  return fields


def _rescaled(row: dict) -> bool:
  """Whether the row's rescale changes its values (else the stored values,
  cast, are the rescaled ones: no float64 pass is needed)."""
  slope, intercept = row['rescale_slope'], row['rescale_intercept']
  return slope not in (None, 1) or intercept not in (None, 0)


def _plan(rows: Sequence[dict]) -> tuple[_Layout | None, list[str]]:
  """Where each of a series' rows goes, or why it cannot be stacked.

  Args:
    rows: the slice rows of one series (LAYOUT_COLUMNS), sorted by
      ``slice_index``.

  Returns:
    (layout, []) or (None, problems): ``layout.grid`` (phase, z) holds row
    numbers into ``rows``.
  """
  problems = _header_problems(rows)
  if problems:
    return None, problems
  orientation = rows[0]['image_orientation_patient']
  normal = geometry.normal(orientation)
  positions = np.array([row['image_position_patient'] for row in rows], np.float64)
  along = positions @ normal
  locations = _locations(along)
  problems += _off_axis(rows, positions, along, normal)
  phases, phase_problems = _phases(rows, locations, along)
  problems += phase_problems
  centres = np.array([along[at[0]] for at in locations])
  problems += _gap_problems(centres)
  if problems:
    return None, problems
  grid = np.array(phases, dtype=np.int64).T  # (phase, z)
  first = rows[grid[0, 0]]
  spacing = tuple(float(v) for v in first['pixel_spacing'])
  if len(centres) > 1:
    gap = float((centres[-1] - centres[0]) / (len(centres) - 1))
  else:
    gap = float(first['slice_thickness'] or 1.0)
  affine = geometry.volume_affine(
    first['image_position_patient'], orientation, spacing, gap
  )
  return _Layout(grid, centres, affine, (gap, *spacing)), []


def _header_problems(rows: Sequence[dict]) -> list[str]:
  """Missing or malformed geometry, colour images, and orientations,
  pixel spacings or sizes that differ within the series."""
  problems = []
  for name in ('image_position_patient', 'image_orientation_patient', 'pixel_spacing'):
    size = {'image_position_patient': 3, 'pixel_spacing': 2}.get(name, 6)
    bad = [
      row['slice_index']
      for row in rows
      if row[name] is None
      or len(row[name]) != size
      or not all(v is not None and np.isfinite(v) for v in row[name])
    ]
    if bad:
      problems.append(f'no usable {name} on {_named(bad)}')
  bad = [row['slice_index'] for row in rows if (row['samples_per_pixel'] or 1) > 1]
  if bad:
    problems.append(f'{_named(bad)}: colour images (samples_per_pixel > 1)')
  if problems:
    return problems
  for row in rows:
    try:
      geometry.cosines(row['image_orientation_patient'])
    except ValueError as e:
      problems.append(f'slice {row["slice_index"]}: {e}')
  if problems:
    return problems
  return [p for check in _MIXED if (p := _mixed(rows, *check))]


def _mixed(rows: Sequence[dict], what: str, value, differs, shown) -> str | None:
  """A problem naming the slices whose ``value`` ``differs`` from the usual
  one (the most common, rounded), or None."""
  usual = rows[_most_common([_rounded(value(row)) for row in rows])]
  bad = [row for row in rows if differs(value(row), value(usual))]
  if not bad:
    return None
  return (
    f'mixed {what}: {_named([r["slice_index"] for r in bad])} '
    f'{"has" if len(bad) == 1 else "have"} {shown(value(bad[0]))}, '
    f'slice {usual["slice_index"]} {shown(value(usual))}'
  )


def _rounded(values) -> tuple:
  return tuple(round(float(v), 4) for v in values)


def _most_common(keys: list) -> int:
  """The index of the first of the most common keys."""
  counts = collections.Counter(keys)
  return keys.index(max(keys, key=counts.__getitem__))


def _cosines_differ(orientation, reference) -> bool:
  difference = np.asarray(orientation, np.float64) - np.asarray(reference, np.float64)
  return bool(np.max(np.abs(difference)) > COSINE_TOLERANCE)


def _numbers(values) -> str:
  return '[' + ', '.join(f'{v:g}' for v in values) + ']'


# (what, value of a row, whether two values differ, how a value is shown)
_MIXED = (
  ('orientations', lambda r: r['image_orientation_patient'], _cosines_differ, _numbers),
  (
    'pixel spacings',
    lambda r: r['pixel_spacing'],
    lambda a, b: not np.allclose(a, b, rtol=SPACING_RELATIVE, atol=0),
    _numbers,
  ),
  (
    'image sizes',
    lambda r: (r['rows'], r['columns']),
    lambda a, b: a != b,
    lambda size: f'{size[0]} x {size[1]}',
  ),
)


def _locations(along: np.ndarray) -> list[list[int]]:
  """Row numbers grouped by location, locations ascending along the normal:
  a location holds the positions within SAME_POSITION_MM of its lowest."""
  order = np.argsort(along, kind='stable')
  groups: list[list[int]] = []
  for n in order:
    if groups and along[n] - along[groups[-1][0]] <= SAME_POSITION_MM:
      groups[-1].append(int(n))
    else:
      groups.append([int(n)])
  return groups


def _off_axis(
  rows: Sequence[dict], positions: np.ndarray, along: np.ndarray, normal: np.ndarray
) -> list[str]:
  """Slices whose position is not on the stack's axis (shifted in-plane
  from the usual offset, the most common): the volume affine could not
  place them."""
  offsets = positions - np.outer(along, normal)
  usual = _most_common([_rounded(offset) for offset in offsets])
  shift = np.linalg.norm(offsets - offsets[usual], axis=1)
  bad = np.flatnonzero(shift > SAME_POSITION_MM)
  if not len(bad):
    return []
  return [
    f'positions off the stack axis: {_named([rows[n]["slice_index"] for n in bad])} '
    f'shifted in-plane by up to {shift.max():.3g} mm from slice '
    f'{rows[usual]["slice_index"]}'
  ]


def _phases(
  rows: Sequence[dict], locations: list[list[int]], along: np.ndarray
) -> tuple[list[list[int]], list[str]]:
  """Each location's row numbers in phase order, and the problems: trigger
  times on some slices only, a location holding one phase twice (two slices
  at one position without trigger times, or with the same one), and
  unequal phase counts (unless one of the others explains them)."""
  problems = []
  timed = [row['trigger_time'] is not None for row in rows]
  if any(timed) and not all(timed):
    untimed = [row['slice_index'] for row, t in zip(rows, timed, strict=True) if not t]
    problems.append(f'no trigger_time on {_named(untimed)}, which other slices have')
  phases = []
  for z, location in enumerate(locations):
    ordered = sorted(
      location,
      key=lambda n: (
        rows[n]['trigger_time'] or 0.0,
        rows[n]['instance_number'] or 0,
        rows[n]['slice_index'],
      ),
    )
    for a, b in zip(ordered, ordered[1:], strict=False):
      ta, tb = rows[a]['trigger_time'], rows[b]['trigger_time']
      untimed = ta is None and tb is None
      if untimed or (None not in (ta, tb) and abs(tb - ta) <= SAME_TRIGGER_MS):
        when = '' if ta is None else f' and trigger time {ta:g} ms'
        problems.append(
          f'duplicate position: slices {rows[a]["slice_index"]} and '
          f'{rows[b]["slice_index"]} lie at {along[a]:.2f} mm{when} (z {z})'
        )
    phases.append(ordered)
  counts = [len(p) for p in phases]
  if len(set(counts)) > 1 and not problems:  # a duplicate is the cause
    usual = max(set(counts), key=lambda c: (counts.count(c), c))
    odd = ', '.join(
      f'{c} at z {z} ({along[phases[z][0]]:.2f} mm)'
      for z, c in enumerate(counts)
      if c != usual
    )
    problems.append(f'unequal phase counts: {usual} phases per location, but {odd}')
  return phases, problems


def _gap_problems(centres: np.ndarray) -> list[str]:
  """Gaps between locations that differ from the usual gap by more than
  GAP_RELATIVE of it plus GAP_ABSOLUTE_MM: a whole multiple of it is a
  missing slice, anything else an uneven gap. The usual gap is the most
  common one; on a tie, the nearest the mean gap, then the smaller."""
  gaps = np.diff(centres)
  if not len(gaps):
    return []
  tolerance = lambda gap: GAP_RELATIVE * gap + GAP_ABSOLUTE_MM
  mean = float(gaps.mean())
  usual = min(
    gaps,
    key=lambda g: (
      -int(np.sum(np.abs(gaps - g) <= tolerance(g))),
      abs(float(g) - mean),
      float(g),
    ),
  )
  problems = []
  for z, gap in enumerate(gaps):
    if abs(gap - usual) <= tolerance(usual):
      continue
    between = (
      f'the gap between z {z} ({centres[z]:.2f} mm) and z {z + 1} '
      f'({centres[z + 1]:.2f} mm) is {gap:.3f} mm'
    )
    times = round(gap / usual)
    if times >= 2 and abs(gap - times * usual) <= times * tolerance(usual):
      missing = times - 1
      problems.append(
        f'missing slice: {between}, {times} x the usual {usual:.3f} mm '
        f'({missing} location{"s" if missing > 1 else ""} missing)'
      )
    else:
      problems.append(f'uneven gap: {between}, the usual is {usual:.3f} mm')
  return problems


def _named(slice_indices: Sequence[int]) -> str:
  """'slice 3', 'slices 3, 5 and 8', or the first few and 'N more'."""
  names = [str(k) for k in slice_indices]
  if len(names) == 1:
    return f'slice {names[0]}'
  if len(names) > _NAMED:
    return f'slices {", ".join(names[:_NAMED])} and {len(names) - _NAMED} more'
  return f'slices {", ".join(names[:-1])} and {names[-1]}'
