"""Volumes: a patient's slices stacked by series, location and phase, checked
against the DICOM headers themselves (read with pydicom), and every
problem reported instead of stacked."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pydicom
import pytest

from beam_pipeline.dataset import image_of, mask_of, open_dataset
from beam_pipeline.dataset.labels import label_map
from beam_pipeline.dataset.volumes import LAYOUT_COLUMNS, assemble, volumes
from beam_pipeline.launch import cli
from beam_pipeline.tools import sample
from transforms.contract import layout, schema

CINE = sample.Cine(locations=4, phases=5, shuffled=True)
ROWS, COLUMNS = 24, 20  # not square: rows and columns cannot be swapped unseen
NORMAL = np.cross(CINE.orientation[:3], CINE.orientation[3:])
# One patient per case, in link order (SCD0000101, ...).
CASES = (
  'clean',
  'two_series',
  'uneven_gap',
  'missing_slice',
  'mixed_orientation',
  'unequal_phases',
  'duplicate',
  'off_axis',
  'burned_in',
)


def _dicom_path(root, pid, k):
  return os.path.join(root, layout.DICOM_DIR, pid, f'{k}.dcm')


def _edit(root, pid, change):
  """Calls change(ds, k, location, phase) on each slice of a patient and
  saves the slices it returns True for."""
  for k in range(1, CINE.slices + 1):
    path = _dicom_path(root, pid, k)
    ds = pydicom.dcmread(path)
    if change(ds, k, *CINE.slot(k)):
      ds.save_as(path)


def _shift(ds, vector):
  position = np.array(ds.ImagePositionPatient, float) + vector
  ds.ImagePositionPatient = [f'{v:.6f}' for v in position]
  return True


def _second_series(ds, k, location, phase):
  """Locations 2 and 3 become an axial series of their own."""
  if location < 2:
    return False
  ds.SeriesInstanceUID = f'{sample.UID_ROOT}.999.2'
  ds.ImageOrientationPatient = ['1', '0', '0', '0', '1', '0']
  ds.ImagePositionPatient = ['-100.0', '-120.0', f'{10.0 * location:.1f}']
  return True


def _rotated(ds, k, location, phase):
  """Slice 1 turned 2 degrees in its own plane (same normal)."""
  if k != 1:
    return False
  a = np.radians(2)
  row, column = np.array(CINE.orientation[:3]), np.array(CINE.orientation[3:])
  turned = np.concatenate(
    [np.cos(a) * row + np.sin(a) * column, -np.sin(a) * row + np.cos(a) * column]
  )
  ds.ImageOrientationPatient = [f'{v:.8f}' for v in turned]
  return True


def _same_trigger_time(root, pid):
  """A second slice at slice 1's location gets slice 1's trigger time."""
  location = CINE.slot(1)[0]
  other = next(k for k in range(2, CINE.slices + 1) if CINE.slot(k)[0] == location)
  trigger = pydicom.dcmread(_dicom_path(root, pid, 1)).TriggerTime
  _edit(root, pid, lambda ds, k, *_: k == other and _set(ds, TriggerTime=trigger))


def _set(ds, **tags):
  for keyword, value in tags.items():
    setattr(ds, keyword, value)
  return True


def _spoil(root, pid, case):
  """Edits a patient's headers (or files) into ``case``."""
  row_cosine = np.array(CINE.orientation[:3])
  if case == 'two_series':
    _edit(root, pid, _second_series)
  elif case == 'uneven_gap':
    _edit(root, pid, lambda ds, k, loc, ph: loc == 3 and _shift(ds, 3 * NORMAL))
  elif case == 'missing_slice':
    _edit(root, pid, lambda ds, k, loc, ph: loc >= 2 and _shift(ds, CINE.gap * NORMAL))
  elif case == 'mixed_orientation':
    _edit(root, pid, _rotated)
  elif case == 'unequal_phases':
    os.remove(_dicom_path(root, pid, 1))  # unlabeled: 1 is no multiple of 3
  elif case == 'duplicate':
    _same_trigger_time(root, pid)
  elif case == 'off_axis':
    _edit(root, pid, lambda ds, k, *_: k == 1 and _shift(ds, 2 * row_cosine))
  elif case == 'burned_in':
    _edit(
      root, pid, lambda ds, k, loc, ph: loc == 1 and _set(ds, BurnedInAnnotation='YES')
    )


@pytest.fixture(scope='module')
def cine(tmp_path_factory):
  """(root, out, {case: patient_id}): one run over a cine tree whose
  patients each hold one case."""
  base = tmp_path_factory.mktemp('cine')
  root, out = str(base / 'DATA'), str(base / 'OUT')
  manifest = sample.make_tree(
    root, patients=len(CASES), rows=ROWS, columns=COLUMNS, cine=CINE
  )
  ids = dict(zip(CASES, (pid for pid, _ in manifest.links), strict=True))
  for case, pid in ids.items():
    _spoil(root, pid, case)
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_OK
  return root, out, ids


def _headers(root, pid):
  """{slice_index: pydicom dataset} of a patient's files."""
  folder = os.path.join(root, layout.DICOM_DIR, pid)
  return {
    int(name[: -len('.dcm')]): pydicom.dcmread(os.path.join(folder, name))
    for name in os.listdir(folder)
  }


def _only(out, pid, **options):
  (volume,) = volumes(out, pid, **options)
  return volume


def test_the_stacked_arrays_are_the_rows(cine):
  _, out, ids = cine
  pid = ids['clean']
  volume = _only(out, pid, labels=True, ignore=3)
  assert volume.problems == ()
  assert volume.image.shape == (CINE.phases, CINE.locations, ROWS, COLUMNS)
  assert volume.image.dtype == np.float32 and volume.i_mask.dtype == bool
  table = open_dataset(out).to_table(filter=pc.field('patient_id') == pid)
  rows = {row['slice_index']: row for row in table.to_pylist()}
  assert sorted(volume.slice_index.ravel()) == sorted(rows) == list(volume.slices)
  unlabeled = 0
  for (p, z), k in np.ndenumerate(volume.slice_index):
    row = rows[k]
    np.testing.assert_array_equal(
      volume.image[p, z], image_of(row, rescale=True).astype(np.float32)
    )
    inner, outer = mask_of(row, 'i'), mask_of(row, 'o')
    assert volume.has_i_mask[p, z] == (inner is not None)
    assert volume.has_o_mask[p, z] == (outer is not None)
    none = np.zeros((ROWS, COLUMNS), bool)
    np.testing.assert_array_equal(volume.i_mask[p, z], none if inner is None else inner)
    np.testing.assert_array_equal(volume.o_mask[p, z], none if outer is None else outer)
    expected = label_map(
      none if inner is None else inner,
      none if outer is None else outer,
      inner is not None,
      outer is not None,
      ignore=3,
    )
    np.testing.assert_array_equal(volume.labels[p, z], expected)
    assert volume.qa_flags[p, z] == tuple(row['qa_flags'])
    if inner is None and outer is None:
      unlabeled += 1
      assert (volume.labels[p, z] == 3).all()
  assert unlabeled and volume.has_i_mask.any() and volume.has_o_mask.any()
  stored = _only(out, pid, rescale=False, dtype=None)
  assert stored.image.dtype == np.int16
  k = int(stored.slice_index[1, 2])
  np.testing.assert_array_equal(stored.image[1, 2], image_of(rows[k]))


def test_the_affine_is_the_one_the_dicom_headers_give(cine):
  root, out, ids = cine
  pid = ids['clean']
  volume = _only(out, pid)
  headers = _headers(root, pid)
  ds = headers[1]
  row, column = (np.array(ds.ImageOrientationPatient[i : i + 3], float) for i in (0, 3))
  normal = np.cross(row, column)
  positions = {k: np.array(h.ImagePositionPatient, float) for k, h in headers.items()}
  lowest = min(positions.values(), key=lambda p: p @ normal)
  highest = max(positions.values(), key=lambda p: p @ normal)
  gap = (highest - lowest) @ normal / (CINE.locations - 1)
  spacing = [float(v) for v in ds.PixelSpacing]
  expected = np.eye(4)
  expected[:3, 0] = normal * gap
  expected[:3, 1] = column * spacing[0]
  expected[:3, 2] = row * spacing[1]
  expected[:3, 3] = lowest
  np.testing.assert_allclose(volume.affine, expected, atol=1e-6)
  flip = np.diag([-1.0, -1.0, 1.0, 1.0])
  np.testing.assert_allclose(volume.ras_affine, flip @ expected, atol=1e-6)
  assert volume.spacing == pytest.approx((gap, *spacing))
  # Each slice's first pixel lies at its own ImagePositionPatient, and the
  # trigger times are the headers', rising with the phase at every location.
  for (p, z), k in np.ndenumerate(volume.slice_index):
    np.testing.assert_allclose(
      volume.affine @ [z, 0, 0, 1], [*positions[k], 1], atol=1e-5
    )
    assert volume.trigger_time[p, z] == pytest.approx(float(headers[k].TriggerTime))
  assert (np.diff(volume.trigger_time, axis=0) > 0).all()
  assert (np.diff(volume.location) > 0).all()


def test_slices_are_sorted_by_position_and_time_not_by_number(cine):
  _, out, ids = cine
  volume = _only(out, ids['clean'])
  numbers = volume.slice_index.ravel()
  assert not (np.diff(numbers) > 0).all()  # the generator shuffled them
  for (p, z), k in np.ndenumerate(volume.slice_index):
    assert CINE.slot(int(k)) == (z, p)


def test_a_patients_series_are_volumes_of_their_own(cine):
  root, out, ids = cine
  pid = ids['two_series']
  found = list(volumes(out, pid))
  assert [v.series for v in found] == [0, 1]
  assert all(v.problems == () for v in found)
  assert [v.image.shape for v in found] == [(CINE.phases, 2, ROWS, COLUMNS)] * 2
  assert min(found[0].slices) < min(found[1].slices)
  headers = _headers(root, pid)
  for volume in found:
    uids = {headers[int(k)].SeriesInstanceUID for k in volume.slice_index.ravel()}
    assert uids == {volume.series_instance_uid}
  axial = next(v for v in found if v.series_instance_uid.endswith('.999.2'))
  np.testing.assert_allclose(axial.affine[:3, 0], [0, 0, 10])
  np.testing.assert_allclose(axial.location, [20, 30])


@pytest.mark.parametrize(
  'case, problem',
  [
    ('uneven_gap', 'uneven gap: the gap between z 2'),
    ('missing_slice', 'missing slice: the gap between z 1'),
    ('mixed_orientation', 'mixed orientations: slice 1 has'),
    ('unequal_phases', 'unequal phase counts: 5 phases per location, but 4 at z'),
    ('duplicate', 'duplicate position: slices 1 and'),
    ('off_axis', 'positions off the stack axis: slice 1 shifted in-plane by up to 2'),
  ],
)
def test_each_problem_is_reported_and_nothing_stacked(cine, case, problem):
  _, out, ids = cine
  volume = _only(out, ids[case])
  assert volume.problems and volume.problems[0].startswith(problem), volume.problems
  assert volume.image is None and volume.affine is None and volume.slice_index is None
  assert volume.slices  # the slices are still named
  listed = _only(out, ids[case], stack=False)
  assert listed.problems == volume.problems and listed.image is None


def test_excluded_slices_are_dropped_before_stacking(cine):
  _, out, ids = cine
  pid = ids['burned_in']
  kept = _only(out, pid)
  assert kept.problems == () and kept.qa_flags[0, 1] == ('burned_in_annotation_risk',)
  dropped = _only(out, pid, exclude_flags=['burned_in_annotation_risk'])
  assert len(dropped.slices) == CINE.slices - CINE.phases
  assert dropped.problems == (
    'missing slice: the gap between z 0 (13.75 mm) and z 1 (33.75 mm) is '
    '20.000 mm, 2 x the usual 10.000 mm (1 location missing)',
  )


def test_without_stacking_no_pixels_are_read_but_the_geometry_is(cine):
  _, out, ids = cine
  listed = {v.patient_id: v for v in volumes(out, stack=False) if v.series == 0}
  assert set(listed) == set(ids.values())
  clean = listed[ids['clean']]
  assert clean.image is None and clean.i_mask is None and clean.problems == ()
  np.testing.assert_array_equal(clean.slice_index, _only(out, ids['clean']).slice_index)
  assert clean.affine is not None
  assert sum(bool(v.problems) for v in listed.values()) == 6


def test_a_name_that_is_no_flag_is_refused_before_reading(cine):
  _, out, _ = cine
  with pytest.raises(ValueError, match='burned_in is not a quality flag'):
    volumes(out, exclude_flags=['burned_in'])


# Rows made by hand, for the rules' edges.
_FIELDS = [schema.SLICE_SCHEMA.field(name) for name in LAYOUT_COLUMNS]
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _table(heights, **changes):
  """Axial slices at these heights (mm), one per location unless trigger
  times say otherwise; ``changes`` maps a column to its value per slice."""
  rows = []
  for n, height in enumerate(heights):
    row = {
      'patient_id': 'P',
      'split': 'train',
      'slice_index': n + 1,
      'series_instance_uid': '1.2.3',
      'instance_number': n + 1,
      'rows': 4,
      'columns': 6,
      'samples_per_pixel': 1,
      'pixel_dtype': 'int16',
      'pixel_spacing': [1.5, 1.25],
      'slice_thickness': 8.0,
      'image_position_patient': [-10.0, 20.0, height],
      'image_orientation_patient': AXIAL,
      'trigger_time': None,
      'qa_flags': [],
    }
    row.update({name: values[n] for name, values in changes.items()})
    rows.append(row)
  return pa.Table.from_pylist(rows, schema=pa.schema(_FIELDS))


def _problems(table):
  (volume,) = assemble(table, stack=False)
  return volume.problems


def test_a_gap_is_even_within_a_thousandth_plus_a_thousandth_of_a_mm():
  tolerance = 1e-3 * 10 + 1e-3
  assert _problems(_table([0, 10, 20, 30 + 0.9 * tolerance])) == ()
  (problem,) = _problems(_table([0, 10, 20, 30 + 1.1 * tolerance]))
  assert problem.startswith('uneven gap: the gap between z 2 (20.00 mm) and z 3')
  (problem,) = _problems(_table([0, 10, 30, 40]))
  assert problem.endswith('2 x the usual 10.000 mm (1 location missing)')
  (problem,) = _problems(_table([0, 10, 40]))
  assert problem.endswith('3 x the usual 10.000 mm (2 locations missing)')


def test_without_trigger_times_a_series_has_one_phase():
  (volume,) = assemble(_table([20, 0, 10]), stack=False)
  assert volume.problems == () and volume.slice_index.tolist() == [[2, 3, 1]]
  assert np.isnan(volume.trigger_time).all()
  (problem,) = _problems(_table([0, 10, 10]))
  assert problem == 'duplicate position: slices 2 and 3 lie at 10.00 mm (z 1)'
  (problem,) = _problems(_table([0, 0, 10, 10], trigger_time=[0.0, 50.0, None, 50.0]))
  assert problem == 'no trigger_time on slice 3, which other slices have'


def test_phases_follow_trigger_times_per_location():
  table = _table([0, 0, 10, 10], trigger_time=[40.0, 0.0, 1.5, 41.5])
  (volume,) = assemble(table, stack=False)
  assert volume.slice_index.tolist() == [[2, 3], [1, 4]]
  assert volume.trigger_time.tolist() == [[0.0, 1.5], [40.0, 41.5]]


def test_mixed_spacing_size_and_missing_geometry_are_problems():
  spacing = [[1.5, 1.25]] * 2 + [[1.5, 1.3]]
  assert _problems(_table([0, 10, 20], pixel_spacing=spacing)) == (
    'mixed pixel spacings: slice 3 has [1.5, 1.3], slice 1 [1.5, 1.25]',
  )
  assert _problems(_table([0, 10, 20], rows=[4, 5, 5])) == (
    'mixed image sizes: slice 1 has 4 x 6, slice 2 5 x 6',
  )
  positions = [[0.0, 0.0, 0.0], None, [0.0, 0.0, 2.0]]
  assert _problems(_table([0, 1, 2], image_position_patient=positions)) == (
    'no usable image_position_patient on slice 2',
  )


def test_a_single_location_spans_its_slice_thickness():
  (volume,) = assemble(_table([5.0]), stack=False)
  assert volume.spacing == (8.0, 1.5, 1.25)
  np.testing.assert_allclose(volume.affine[:3, 0], [0, 0, 8])


def test_dropping_a_series_never_renumbers_the_others():
  table = _table(
    [0, 10, 0, 10],
    series_instance_uid=['1.2.3', '1.2.3', '1.2.4', '1.2.4'],
    qa_flags=[['constant_image']] * 2 + [[]] * 2,
  )
  assert [v.series for v in assemble(table, stack=False)] == [0, 1]
  (volume,) = assemble(table, stack=False, exclude_flags=['constant_image'])
  assert volume.series == 1 and volume.slices == (3, 4)
