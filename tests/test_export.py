"""cardiac-mri export: NIfTI volumes in nnU-Net v2's raw layout, read back
with nibabel and held to the DICOM files themselves (pydicom)."""

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from beam_pipeline.dataset.volumes import volumes
from beam_pipeline.launch import cli
from beam_pipeline.tools import export, sample
from tests.helpers import identifiers, leaks, texts_under
from transforms.contract import layout

nibabel = pytest.importorskip('nibabel')

CINE = sample.Cine(locations=4, phases=5, shuffled=True)
ROWS, COLUMNS = 24, 20  # not square: x and y cannot be swapped unseen
NAME = export.DEFAULT_NAME
KEY = bytes(range(32))
BURNED_IN = 'burned_in_annotation_risk'
_CASE = re.compile(r'(?P<pid>.+)_s(?P<series>[0-9]+)_p(?P<phase>[0-9]+)')
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # LPS <-> RAS


def _dicom_path(root, pid, k):
  return os.path.join(root, layout.DICOM_DIR, pid, f'{k}.dcm')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(root, manifest, plain output, keyed output, burned-in patient): a cine
  tree with identifiers in every header, one patient's location 1 marked
  burned-in, run without and with a pseudonymisation key."""
  base = tmp_path_factory.mktemp('export')
  root = str(base / 'DATA')
  manifest = sample.make_tree(
    root, patients=5, rows=ROWS, columns=COLUMNS, cine=CINE, quirks=['phi']
  )
  burned = manifest.links[-1][0]
  for k in range(1, CINE.slices + 1):
    if CINE.slot(k)[0] == 1:
      ds = pydicom.dcmread(_dicom_path(root, burned, k))
      ds.BurnedInAnnotation = 'YES'
      ds.save_as(_dicom_path(root, burned, k))
  key = base / 'key'
  key.write_bytes(KEY)
  key.chmod(0o600)
  plain, keyed = str(base / 'plain'), str(base / 'keyed')
  common = ['--input', root, '--split', '0.6,0.2,0.2']
  assert cli.main([*common, '--output', plain]) == cli.EXIT_OK
  assert (
    cli.main([*common, '--output', keyed, '--pseudonymize-key-file', str(key)])
    == cli.EXIT_OK
  )
  return root, manifest, plain, keyed, burned


@pytest.fixture(scope='module')
def exported(runs, tmp_path_factory):
  """The plain output exported: (folder, exit code, stdout)."""
  _, _, plain, _, _ = runs
  destination = str(tmp_path_factory.mktemp('dest'))
  code, out = _export(plain, destination)
  return os.path.join(destination, NAME), code, out


def _export(*args):
  """export.main in this process: (exit code, stdout) (stderr is shown)."""
  import contextlib
  import io

  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    code = export.main([str(a) for a in args])
  return code, stdout.getvalue()


def _cases(folder, sub):
  """{case: path} of a subfolder's .nii.gz files (images without _0000)."""
  path = os.path.join(folder, sub)
  if not os.path.isdir(path):
    return {}
  return {
    name[: -len('.nii.gz')].removesuffix('_0000'): os.path.join(path, name)
    for name in os.listdir(path)
  }


def test_the_export_is_an_nnunet_v2_raw_dataset(exported):
  folder, code, out = exported
  assert code == export.EXIT_OK, out
  with open(os.path.join(folder, 'dataset.json')) as f:
    description = json.load(f)
  training, labels = _cases(folder, 'imagesTr'), _cases(folder, 'labelsTr')
  assert description == {
    'channel_names': {'0': 'MRI'},
    'labels': {'background': 0, 'blood_pool': 1, 'myocardium': 2, 'ignore': 3},
    'numTraining': len(training),
    'file_ending': '.nii.gz',
  }
  assert max(description['labels'].values()) == description['labels']['ignore']
  assert training and set(training) == set(labels)
  for path in training.values():
    assert path.endswith('_0000.nii.gz')
  test = _cases(folder, 'imagesTs')
  assert test and not set(test) & set(training)
  assert set(_cases(folder, 'labelsTs')) <= set(test)
  assert sorted(os.listdir(os.path.dirname(folder))) == [NAME]  # no temp folder
  assert f'{len(training) + len(test)} case(s)' in out.splitlines()[-1]


def test_training_and_test_cases_follow_the_splits(runs, exported):
  _, _, plain, _, _ = runs
  folder, _, _ = exported
  training, test = _cases(folder, 'imagesTr'), _cases(folder, 'imagesTs')
  split_of = {v.patient_id: v.split for v in volumes(plain, stack=False)}
  assert set(split_of.values()) == {'train', 'val', 'test'}
  for case in training:
    assert split_of[_CASE.fullmatch(case)['pid']] in ('train', 'val')
  for case in test:
    assert split_of[_CASE.fullmatch(case)['pid']] == 'test'
  # Every phase of a test patient is there, labeled or not; a training
  # phase only when labeled.
  test_patients = {p for p, s in split_of.items() if s == 'test'}
  assert len(test) == len(test_patients) * CINE.phases


def _header_geometry(root, pid, phase):
  """The files of a phase along the normal, from their headers alone:
  [(z, pydicom dataset)], and the RAS affine of the index (x, y, z)."""
  files = [
    pydicom.dcmread(_dicom_path(root, pid, k))
    for k in range(1, CINE.slices + 1)
    if CINE.slot(k)[1] == phase
  ]
  orientation = np.array(files[0].ImageOrientationPatient, float)
  row, column = orientation[:3], orientation[3:]
  normal = np.cross(row, column)
  files.sort(key=lambda ds: np.array(ds.ImagePositionPatient, float) @ normal)
  positions = [np.array(ds.ImagePositionPatient, float) for ds in files]
  gap = (positions[-1] - positions[0]) @ normal / (len(files) - 1)
  dr, dc = (float(v) for v in files[0].PixelSpacing)
  lps = np.eye(4)
  lps[:3, 0] = row * dc  # x: along a row, the column index
  lps[:3, 1] = column * dr  # y: down a column, the row index
  lps[:3, 2] = normal * gap
  lps[:3, 3] = positions[0]
  return list(enumerate(files)), _FLIP @ lps


def test_the_nifti_data_and_affine_are_the_dicom_files(runs, exported):
  root, _, _, _, _ = runs
  folder, _, _ = exported
  cases = {**_cases(folder, 'imagesTr'), **_cases(folder, 'imagesTs')}
  assert len(cases) > 10
  for case, path in cases.items():
    parts = _CASE.fullmatch(case)
    image = nibabel.load(path)
    assert image.shape == (COLUMNS, ROWS, CINE.locations)
    files, expected = _header_geometry(root, parts['pid'], int(parts['phase']))
    np.testing.assert_allclose(image.affine, expected, atol=1e-4)
    np.testing.assert_allclose(image.get_qform(), expected, atol=1e-4)
    data = np.asarray(image.dataobj)
    for z, ds in files:
      np.testing.assert_array_equal(data[:, :, z].T, ds.pixel_array)
      # The first voxel of slice z lies at its ImagePositionPatient, and the
      # last voxel of its first row one row's width along the row cosine.
      position = np.array(ds.ImagePositionPatient, float)
      ras = _FLIP[:3, :3] @ position
      np.testing.assert_allclose((image.affine @ [0, 0, z, 1])[:3], ras, atol=1e-4)
      along_row = position + (COLUMNS - 1) * float(ds.PixelSpacing[1]) * np.array(
        ds.ImageOrientationPatient[:3], float
      )
      np.testing.assert_allclose(
        (image.affine @ [COLUMNS - 1, 0, z, 1])[:3],
        _FLIP[:3, :3] @ along_row,
        atol=1e-4,
      )


def test_the_nifti_files_hold_the_volume_arrays_and_labels(runs, exported):
  _, _, plain, _, _ = runs
  folder, _, _ = exported
  found = {
    export.case_id(v, p): (v, p)
    for v in volumes(plain, labels=True, ignore=export.IGNORE)
    for p in range(v.phases)
  }
  labels = {**_cases(folder, 'labelsTr'), **_cases(folder, 'labelsTs')}
  images = {**_cases(folder, 'imagesTr'), **_cases(folder, 'imagesTs')}
  undecided = 0
  for case, path in images.items():
    volume, phase = found[case]
    data = np.asarray(nibabel.load(path).dataobj)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, export.nifti_data(volume.image[phase]))
    if case not in labels:
      assert not volume.labeled(phase)
      continue
    label = np.asarray(nibabel.load(labels[case]).dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(label, export.nifti_data(volume.labels[phase]))
    for z in range(volume.image.shape[1]):
      if not (volume.has_i_mask[phase, z] or volume.has_o_mask[phase, z]):
        assert (label[:, :, z] == export.IGNORE).all()
        undecided += 1
  assert undecided  # some labeled case holds a slice without contours


def test_a_series_with_a_problem_is_left_out_and_listed(runs, tmp_path, capsys):
  _, _, plain, _, burned = runs
  code, out = _export(plain, tmp_path, '--exclude-flags', f' {BURNED_IN}, ')
  assert code == export.EXIT_LEFT_OUT
  lines = out.splitlines()
  assert lines[0].startswith(f'left out: {burned} series 0: missing slice: ')
  assert lines[1] == '1 series left out for 1 problem(s)'
  assert 'skipped: 1 series with problems' in lines[-1]
  names = os.listdir(tmp_path / NAME / 'imagesTr') + os.listdir(
    tmp_path / NAME / 'imagesTs'
  )
  assert names and not [n for n in names if n.startswith(burned)]
  assert 'export: 5 of 5 patients read' in capsys.readouterr().err


def test_an_existing_dataset_is_refused_unless_overwritten(runs, tmp_path, capsys):
  _, _, plain, _, _ = runs
  stale = tmp_path / NAME / 'stale.txt'
  stale.parent.mkdir()
  stale.write_text('old')
  code, out = _export(plain, tmp_path)
  assert code == export.EXIT_USAGE and not out
  (line,) = capsys.readouterr().err.splitlines()
  assert line == f'error: {tmp_path / NAME} is not empty (--overwrite replaces it)'
  assert stale.exists()
  code, _ = _export(plain, tmp_path, '--overwrite')
  assert code == export.EXIT_OK and not stale.exists()
  assert os.listdir(tmp_path) == [NAME]
  assert os.path.exists(tmp_path / NAME / 'dataset.json')


def test_a_failed_export_leaves_nothing_behind(runs, tmp_path, monkeypatch):
  _, _, plain, _, _ = runs
  written = []
  real = export._write_nifti

  def fails_on_the_fourth(nibabel, path, data, affine):
    if len(written) == 3:
      raise OSError(28, 'No space left on device')
    written.append(path)
    real(nibabel, path, data, affine)

  monkeypatch.setattr(export, '_write_nifti', fails_on_the_fourth)
  with pytest.raises(OSError, match='No space left'):
    export.export(plain, str(tmp_path))
  assert len(written) == 3 and os.listdir(tmp_path) == []


@pytest.mark.parametrize(
  'args, message',
  [
    (['--dataset-name', 'Cardiac'], '--dataset-name must be DatasetNNN_Name'),
    (['--exclude-flags', 'burned_in'], 'burned_in is not a quality flag'),
    (['--layout', 'monai'], "invalid choice: 'monai'"),
    (['--bogus'], 'unrecognized arguments: --bogus'),
    (['--version', '7'], 'version 7'),
  ],
)
def test_usage_errors_are_one_line_and_exit_two(runs, tmp_path, capsys, args, message):
  _, _, plain, _, _ = runs
  code, out = _export(plain, tmp_path / 'DEST', *args)
  assert code == export.EXIT_USAGE and not out
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith('error: ') and message in line, line
  assert not os.path.exists(tmp_path / 'DEST')


def test_not_an_output_or_no_nibabel_exit_two(runs, tmp_path, capsys, monkeypatch):
  _, _, plain, _, _ = runs
  assert _export(tmp_path / 'nothing', tmp_path / 'DEST')[0] == export.EXIT_USAGE
  (line,) = capsys.readouterr().err.splitlines()
  assert line.endswith('a pipeline output?')
  monkeypatch.setitem(sys.modules, 'nibabel', None)  # import nibabel fails
  assert _export(plain, tmp_path / 'DEST')[0] == export.EXIT_USAGE
  (line,) = capsys.readouterr().err.splitlines()
  assert line == 'error: export needs nibabel, an optional extra: pip install nibabel'
  assert not os.path.exists(tmp_path / 'DEST')


def test_the_console_command_runs_export(tmp_path):
  command = os.path.join(os.path.dirname(sys.executable), 'cardiac-mri')
  if not os.path.exists(command):
    pytest.skip('cardiac-mri is not installed: pip install -e .')
  done = subprocess.run(
    [command, 'export', '--help'], capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0 and done.stdout.startswith('usage: cardiac-mri export ')
  assert '--dataset-name' in done.stdout and '--exclude-flags' in done.stdout
  done = subprocess.run(
    [command, 'export', str(tmp_path)], capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_a_pseudonymised_export_holds_no_identifier(runs, tmp_path):
  root, manifest, _, keyed, _ = runs
  assert _export(keyed, tmp_path)[0] == export.EXIT_OK
  forbidden = identifiers(root, manifest)
  assert manifest.links[0][0] in forbidden
  places = []
  for path, data in texts_under(str(tmp_path)):
    places.append(('name', os.path.relpath(path, tmp_path)))
    places.append((path, data))
    if path.endswith('.gz'):
      places.append((f'{path} (inflated)', gzip.decompress(data)))
      header = nibabel.load(path).header
      for field in ('descrip', 'aux_file', 'intent_name', 'db_name'):
        assert header[field].tobytes().strip(b'\0') == b'', (path, field)
  assert len(places) > 20
  assert not leaks(forbidden, places)
  names = os.listdir(tmp_path / NAME / 'imagesTr')
  assert names and all(
    re.fullmatch(r'P[A-Z2-7]{20}_s0_p0[0-4]_0000\.nii\.gz', n) for n in names
  )
