"""The project's own data generator: real DICOM files and contour files.

It writes a data tree in the input layout with known pixel values and known
polygons, and can add each quirk of real trees on demand. It returns a
Manifest of what the pipeline must produce from that tree, built from the
generator's own knowledge (never from the pipeline's code), for tests and
benchmarks to check against.

    python -m beam_pipeline.tools.sample DATA --patients 3 --slices 24 --quirks all
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import zlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from beam_pipeline.tools import pipe
from transforms.contract import layout, schema
from transforms.contract.errors import UsageError

MARKER_FILE = '.cardiac-mri-sample'
UID_ROOT = '1.2.826.0.1.3680043.10.1011'

# Identifying values written into every generated DICOM file. None of them may
# appear in the pipeline's output.
IDENTIFYING = {
  'PatientName': 'Sample^Person',
  'PatientBirthDate': '19700101',
  'PatientAddress': '1 Sample Street, Testville',
  'AccessionNumber': 'ACC0099887766',
  'ReferringPhysicianName': 'Referrer^Doctor',
  'InstitutionName': 'Sample Hospital',
  'OtherPatientIDs': 'OTHER-ID-4242',
}

# Under the 'phi' quirk: a marker in each field that identifies someone in a
# real header (and a private tag holding a name). No marker may appear in
# any output, stdout or stderr (tests/test_privacy.py); each holds PHIMARK,
# except the birth date, a date found nowhere else.
PHI_MARKERS = {
  'PatientName': 'PHIMARK^PATIENT^NAME',
  'OtherPatientIDs': 'PHIMARK-OTHER-ID',
  'PatientBirthDate': '19230817',
  'PatientAddress': '7 PHIMARK Lane, Markertown',
  'InstitutionName': 'PHIMARK Institution',
  'ReferringPhysicianName': 'PHIMARK^REFERRER',
  'AccessionNumber': 'PHIMARKACCN42',
  'StudyID': 'PHIMARKSTUDY7',
  'DeviceSerialNumber': 'PHIMARK-SERIAL-0042',
  'ImageComments': 'PHIMARK image comment: seen by Dr Marker',
  'PatientComments': 'PHIMARK patient comment',
  'StudyComments': 'PHIMARK study comment',
}
PHI_PATIENT_ID = 'PHIMARK-MRN-{n}'  # the header's PatientID, not the link's
PHI_PRIVATE_CREATOR = 'PHIMARK CREATOR'
PHI_PRIVATE_NAME = 'PHIMARK^PRIVATE^NAME'  # in private tag (0009,1001)

QUIRKS = (
  'leading_zero_uids',  # UIDs with components like ".01." (pydicom warns)
  'crlf_links',  # link.csv with CRLF line endings
  'bom_links',  # link.csv starting with a UTF-8 BOM
  'spaced_links',  # stray spaces around link.csv fields
  'stray_files',  # .DS_Store and an editor swap file
  'missing_contours',  # a linked patient without a contour folder
  'contour_without_dicom',  # a contour file whose slice has no .dcm
  'missing_dicoms',  # a link row whose dicoms folder is absent
  'unlinked_dicoms',  # a dicoms folder no link row names
  'unlinked_contours',  # a contour folder no link row names
  'duplicate_link',  # a link row repeated
  'malformed_link',  # a link row whose id would escape the tree
  'truncated_dicom',  # a .dcm cut short in its pixel data
  'not_dicom',  # a text file named .dcm
  'bad_contour',  # a contour file with a non-numeric line
  'short_contour',  # a contour file with two vertices
  'burned_in',  # a slice whose header says BurnedInAnnotation YES
  'phi',  # headers full of identifiers (PHI_MARKERS, a private tag)
)


@dataclasses.dataclass
class ExpectedSlice:
  """A slice the pipeline must write, with the polygons behind its masks."""

  patient_id: str
  original_id: str
  slice_index: int
  rows: int
  columns: int
  i_vertices: list[tuple[float, float]] | None = None
  o_vertices: list[tuple[float, float]] | None = None
  burned_in: bool = False  # flagged burned_in_annotation_risk

  @property
  def labeled(self) -> bool:
    return self.i_vertices is not None or self.o_vertices is not None


@dataclasses.dataclass
class Manifest:
  """What the pipeline must produce from a generated tree."""

  root: str
  slices: dict[tuple[str, int], ExpectedSlice] = dataclasses.field(default_factory=dict)
  # (patient_id, original_id, status)
  reconciliation: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  # (relative path, stage)
  errors: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  # The rows of link.csv, in file order.
  links: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def expected_image(
  patient_id: str, slice_index: int, rows: int, columns: int
) -> np.ndarray:
  """The known pixel values of a generated slice: a cardiac MR-like phantom.

  Like a short-axis MR magnitude image (int16, 12-bit values): dark air with
  Rician-like noise, an elliptic body, a bright blood pool inside a darker
  myocardial ring where the generated contours lie (radii 0.12 and 0.22 of
  the image), and noise everywhere. Its compressibility is that of real
  slices, which the benchmark's Parquet sizes depend on.
  """
  seed = zlib.crc32(f'{patient_id}/{slice_index}'.encode())
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:rows, 0:columns]
  side = min(rows, columns)
  radius = np.hypot(yy - rows / 2, xx - columns / 2) / side
  body = ((xx - columns / 2) / (0.45 * columns)) ** 2 + (
    (yy - rows / 2) / (0.35 * rows)
  ) ** 2 < 1
  level = np.where(body, 350.0 + 150.0 * (yy / rows), 0.0)
  level = np.where(radius < 0.22, 250.0, level)  # myocardium
  level = np.where(radius < 0.12, 900.0 + 30.0 * (slice_index % 7), level)  # blood
  noise = rng.normal(0.0, 12.0, size=(rows, columns))
  image = np.abs(level + noise)  # magnitude images are never negative
  return np.clip(np.rint(image), 0, 4095).astype(np.int16)


def polygon(
  patient_id: str, slice_index: int, kind: str, rows: int, columns: int
) -> list[tuple[float, float]]:
  """A known, jittered circle in pixel coordinates, at half-pixel steps."""
  rng = np.random.default_rng(zlib.crc32(f'{patient_id}/{slice_index}/{kind}'.encode()))
  radius = min(rows, columns) * (0.12 if kind == 'i' else 0.22)
  count = int(rng.integers(12, 40))
  angles = np.sort(rng.uniform(0, 2 * np.pi, count))
  radii = radius * rng.uniform(0.85, 1.15, count)
  cx = columns / 2 + rng.uniform(-3, 3)
  cy = rows / 2 + rng.uniform(-3, 3)
  return [
    (round(2 * (cx + r * np.cos(a))) / 2, round(2 * (cy + r * np.sin(a))) / 2)
    for a, r in zip(angles, radii, strict=True)
  ]


@contextlib.contextmanager
def _lenient_pydicom():
  settings = pydicom.config.settings
  saved = settings.reading_validation_mode, settings.writing_validation_mode
  settings.reading_validation_mode = pydicom.config.IGNORE
  settings.writing_validation_mode = pydicom.config.IGNORE
  try:
    yield
  finally:
    settings.reading_validation_mode, settings.writing_validation_mode = saved


def _uid(patient_id: str, kind: str, index: int, leading_zero: bool = False) -> str:
  """A stable UID; with ``leading_zero``, one component starts with 0."""
  stem = zlib.crc32(f'{patient_id}/{kind}'.encode()) % 10**9 + 1
  return f'{UID_ROOT}.{"0" if leading_zero else ""}{stem}.{index}'


class SliceGeometry(NamedTuple):
  """Where a generated slice lies and when (its DICOM header values)."""

  position: tuple[float, float, float]  # ImagePositionPatient, mm
  orientation: tuple[float, ...]  # ImageOrientationPatient: row, column cosines
  trigger_time: float  # TriggerTime, ms
  slice_location: float  # SliceLocation, mm


# A double-oblique short-axis plane, as a scanner plans one: the row cosine
# tilted 30 degrees from x towards y, the column cosine 20 degrees out of
# the xy plane.
_COS30, _SIN30 = np.cos(np.pi / 6), np.sin(np.pi / 6)
_COS20, _SIN20 = np.cos(np.pi / 9), np.sin(np.pi / 9)
OBLIQUE = (
  _COS30,
  _SIN30,
  0.0,
  -_SIN30 * _COS20,
  _COS30 * _COS20,
  -_SIN20,
)


@dataclasses.dataclass(frozen=True)
class Cine:
  """A cine stack: ``locations`` x ``phases`` slices of one series.

  Slice k (1-based) of a patient is at location ``loc`` and phase ``ph``
  (see :meth:`slot`): its position is ``origin + loc * gap * normal`` (the
  normal is the row cosine x the column cosine), its TriggerTime
  ``ph * cycle / phases + 1.5 * loc`` ms (a later location is triggered a
  little later, as on a scanner), and its SliceLocation the position along
  the normal.
  """

  locations: int = 4
  phases: int = 5
  gap: float = 10.0  # mm between locations
  cycle: float = 900.0  # ms: the R-R interval the phases divide
  orientation: tuple[float, ...] = OBLIQUE
  origin: tuple[float, float, float] = (-95.5, -110.25, 32.0)
  # Number the files (and InstanceNumber) in a seeded random order instead
  # of location by location, phase by phase.
  shuffled: bool = False

  @property
  def slices(self) -> int:
    return self.locations * self.phases

  def slot(self, k: int) -> tuple[int, int]:
    """(location, phase) of slice k, both 0-based."""
    n = k - 1
    if self.shuffled:
      n = int(np.random.default_rng(self.slices).permutation(self.slices)[n])
    location, phase = divmod(n, self.phases)
    return location, phase

  def geometry(self, k: int) -> SliceGeometry:
    """The header geometry of slice k."""
    location, phase = self.slot(k)
    row, column = np.array(self.orientation[:3]), np.array(self.orientation[3:])
    normal = np.cross(row, column)
    position = np.array(self.origin) + location * self.gap * normal
    return SliceGeometry(
      tuple(float(v) for v in position),
      self.orientation,
      phase * self.cycle / self.phases + 1.5 * location,
      float(position @ normal),
    )


def write_dicom(
  path: str,
  pixels: np.ndarray,
  patient_id: str,
  slice_index: int,
  leading_zero_uids: bool = False,
  *,
  geometry: SliceGeometry | None = None,
) -> None:
  """Writes one MR slice with pydicom: Explicit VR Little Endian, int16.

  Args:
    geometry: where the slice lies; by default at z = -40 + 0.5 k mm, axial,
      TriggerTime (k % 20) * 45.5 ms.
  """
  with _lenient_pydicom():
    _write_dicom(path, pixels, patient_id, slice_index, leading_zero_uids, geometry)


def _decimal(values: Sequence[float], places: int) -> list[str]:
  """DS strings (at most 16 characters)."""
  return [f'{v:.{places}f}' for v in values]


def _write_dicom(path, pixels, patient_id, slice_index, leading_zero_uids, geometry):
  rows, columns = pixels.shape
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = MRImageStorage
  meta.MediaStorageSOPInstanceUID = _uid(
    patient_id, 'sop', slice_index, leading_zero=leading_zero_uids
  )
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset(path, {}, file_meta=meta, preamble=b'\0' * 128)
  for keyword, value in IDENTIFYING.items():
    setattr(ds, keyword, value)
  ds.PatientID = patient_id
  ds.SOPClassUID = MRImageStorage
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.StudyInstanceUID = _uid(patient_id, 'study', 1, leading_zero=leading_zero_uids)
  ds.SeriesInstanceUID = _uid(patient_id, 'series', 1, leading_zero=leading_zero_uids)
  ds.Modality = 'MR'
  ds.InstanceNumber = slice_index
  ds.SliceThickness = '8.0'
  ds.SliceLocation = f'{-40.0 + 0.5 * slice_index:.1f}'
  ds.TriggerTime = f'{(slice_index % 20) * 45.5:.1f}'
  ds.PixelSpacing = ['1.40625', '1.40625']
  ds.ImagePositionPatient = [
    '-180.0',
    '-160.5',
    f'{-40.0 + 0.5 * slice_index:.1f}',
  ]
  ds.ImageOrientationPatient = ['1', '0', '0', '0', '1', '0']
  if geometry is not None:
    ds.SliceLocation = f'{geometry.slice_location:.6f}'
    ds.TriggerTime = f'{geometry.trigger_time:.3f}'
    ds.ImagePositionPatient = _decimal(geometry.position, 6)
    ds.ImageOrientationPatient = _decimal(geometry.orientation, 8)
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.Rows = rows
  ds.Columns = columns
  ds.BitsAllocated = 16
  ds.BitsStored = 16
  ds.HighBit = 15
  ds.PixelRepresentation = 1
  ds.PixelData = pixels.astype('<i2').tobytes()
  ds.save_as(path, enforce_file_format=True)


def _write_contour(
  path: str, vertices: Iterable[tuple[float, float]], newline: str = '\n'
) -> None:
  with open(path, 'w', newline='') as f:
    f.write(''.join(f'{x:.2f} {y:.2f}{newline}' for x, y in vertices))


def _patient_ids(n: int) -> list[tuple[str, str]]:
  return [(f'SCD{n_:07d}', f'SC-HF-I-{n_}') for n_ in range(101, 101 + n)]


def make_tree(
  root: str,
  patients: int = 3,
  slices: int = 24,
  rows: int = 128,
  columns: int = 128,
  contour_every: int = 3,
  quirks: Iterable[str] = (),
  *,
  cine: Cine | None = None,
) -> Manifest:
  """Writes a data tree under ``root`` (which must be empty or absent).

  Every ``contour_every``-th slice of each patient gets an i- and an
  o-contour (every other one of those only an i-contour), like real trees in
  which a minority of slices are labeled.

  Args:
    root: the folder to create.
    patients: matched patients with dicoms and contours.
    slices: slices per patient, numbered 1..slices.
    rows, columns: image size.
    contour_every: every n-th slice is labeled.
    quirks: names from QUIRKS to add, or ('all',).
    cine: give each matched patient a cine stack instead (``cine.slices``
      slices, ``slices`` is then ignored; the quirks' extra patients keep
      the default geometry).

  Returns:
    The Manifest of what the pipeline must produce.
  """
  quirks = set(QUIRKS if 'all' in quirks else quirks)
  unknown = quirks - set(QUIRKS)
  if unknown:
    raise ValueError(f'unknown quirks {sorted(unknown)}; known: {QUIRKS}')
  if os.path.exists(root) and os.listdir(root):
    raise ValueError(f'{root} is not empty')
  manifest = Manifest(root=os.path.abspath(root))
  dicoms = os.path.join(root, layout.DICOM_DIR)
  contourfiles = os.path.join(root, layout.CONTOUR_DIR)
  leading_zero = 'leading_zero_uids' in quirks

  def add_patient(
    pid: str,
    oid: str,
    n_slices: int,
    with_dicoms: bool = True,
    with_contours: bool = True,
    stack: Cine | None = None,
  ) -> None:
    if with_dicoms:
      os.makedirs(os.path.join(dicoms, pid))
      for k in range(1, n_slices + 1):
        write_dicom(
          os.path.join(dicoms, pid, f'{k}.dcm'),
          expected_image(pid, k, rows, columns),
          pid,
          k,
          leading_zero_uids=leading_zero,
          geometry=stack.geometry(k) if stack else None,
        )
        manifest.slices[pid, k] = ExpectedSlice(pid, oid, k, rows, columns)
    if with_contours:
      for kind in layout.CONTOUR_KINDS:
        os.makedirs(os.path.join(contourfiles, oid, f'{kind}-contours'))
      for k in range(contour_every, n_slices + 1, contour_every):
        kinds = 'io' if (k // contour_every) % 2 else 'i'
        for kind in kinds:
          vertices = polygon(pid, k, kind, rows, columns)
          _write_contour(_contour_path(root, oid, kind, k), vertices)
          if with_dicoms:
            setattr(manifest.slices[pid, k], f'{kind}_vertices', vertices)

  ids = _patient_ids(patients + 8)
  for pid, oid in ids[:patients]:
    add_patient(pid, oid, cine.slices if cine else slices, stack=cine)
    manifest.reconciliation.append((pid, oid, schema.MATCHED))
    manifest.links.append((pid, oid))
  extra = iter(ids[patients:])
  first_pid, first_oid = ids[0]

  if 'missing_contours' in quirks:
    pid, oid = next(extra)
    add_patient(pid, oid, 4, with_contours=False)
    manifest.links.append((pid, oid))
    manifest.reconciliation += [
      (pid, oid, schema.MATCHED),
      (pid, oid, schema.MISSING_CONTOURS),
    ]
  if 'missing_dicoms' in quirks:
    pid, oid = next(extra)
    add_patient(pid, oid, 4, with_dicoms=False)
    manifest.links.append((pid, oid))
    manifest.reconciliation.append((pid, oid, schema.MISSING_DICOMS))
  if 'unlinked_dicoms' in quirks:
    pid, oid = next(extra)
    add_patient(pid, oid, 2, with_contours=False)
    for k in (1, 2):
      del manifest.slices[pid, k]
    manifest.reconciliation.append((pid, '', schema.UNLINKED_DICOMS))
  if 'unlinked_contours' in quirks:
    pid, oid = next(extra)
    add_patient(pid, oid, contour_every, with_dicoms=False)
    manifest.reconciliation.append(('', oid, schema.UNLINKED_CONTOURS))
  if 'contour_without_dicom' in quirks:
    k = slices + 5
    _write_contour(
      _contour_path(root, first_oid, 'o', k),
      polygon(first_pid, k, 'o', rows, columns),
    )
    manifest.reconciliation.append((first_pid, first_oid, schema.CONTOUR_WITHOUT_DICOM))
  if 'duplicate_link' in quirks:
    manifest.links.append((first_pid, first_oid))
    manifest.reconciliation.append((first_pid, first_oid, schema.DUPLICATE_LINK))
  if 'malformed_link' in quirks:
    manifest.links.append(('../escape', 'SC-HF-I-X'))
    manifest.reconciliation.append(('../escape', 'SC-HF-I-X', schema.MALFORMED_LINK))
  if 'stray_files' in quirks:
    for relative in (
      f'{layout.DICOM_DIR}/{first_pid}/.DS_Store',
      f'{layout.CONTOUR_DIR}/{first_oid}/i-contours/'
      f'.{layout.contour_name("i", contour_every)}.swp',
    ):
      with open(os.path.join(root, *relative.split('/')), 'wb') as f:
        f.write(b'\0\1stray')
      manifest.errors.append((relative, schema.STAGE_LIST))

  if 'phi' in quirks:  # before the quirks that break a file
    _add_phi(dicoms)

  # Quirks that break one slice or contour of the first patient. Slices 1 and
  # 2 are unlabeled (unless contour_every <= 2); contour_every is labeled.
  def dicom_relative(k):
    return f'{layout.DICOM_DIR}/{first_pid}/{k}.dcm'

  if 'truncated_dicom' in quirks:
    path = os.path.join(root, *dicom_relative(1).split('/'))
    with open(path, 'rb+') as f:
      f.truncate(os.path.getsize(path) - rows * columns)
    _drop_slice(manifest, root, first_pid, first_oid, 1)
  if 'not_dicom' in quirks and slices >= 2:
    with open(os.path.join(root, *dicom_relative(2).split('/')), 'w') as f:
      f.write('this is a text file, not DICOM\n')
    _drop_slice(manifest, root, first_pid, first_oid, 2)
  if 'bad_contour' in quirks:
    k = contour_every
    path = _contour_path(root, first_oid, 'i', k)
    with open(path, 'a') as f:
      f.write('12.5 not-a-number\n')
    manifest.slices[first_pid, k].i_vertices = None
    manifest.errors.append((_relative(root, path), schema.STAGE_CONTOUR))
  if 'short_contour' in quirks:
    k = 2 * contour_every
    path = _contour_path(root, first_oid, 'o', k)
    _write_contour(path, [(10.0, 10.0), (20.0, 20.0)])
    if manifest.slices.get((first_pid, k)):
      manifest.slices[first_pid, k].o_vertices = None
    manifest.errors.append((_relative(root, path), schema.STAGE_CONTOUR))

  if 'burned_in' in quirks and (first_pid, slices) in manifest.slices:
    path = os.path.join(root, *dicom_relative(slices).split('/'))
    with _lenient_pydicom():
      ds = pydicom.dcmread(path)
      ds.BurnedInAnnotation = 'YES'
      ds.save_as(path)
    manifest.slices[first_pid, slices].burned_in = True
  _write_links(os.path.join(root, layout.LINK_FILE), manifest.links, quirks)
  with open(os.path.join(root, MARKER_FILE), 'w') as f:
    f.write('generated by beam_pipeline.tools.sample; safe to delete\n')
  return manifest


def _add_phi(dicoms: str) -> None:
  """Writes PHI_MARKERS, a header PatientID unlike the link's and a private
  tag holding a name into every generated .dcm file."""
  if not os.path.isdir(dicoms):
    return
  for n, folder in enumerate(sorted(os.listdir(dicoms))):
    for name in sorted(os.listdir(os.path.join(dicoms, folder))):
      path = os.path.join(dicoms, folder, name)
      with _lenient_pydicom():
        try:
          ds = pydicom.dcmread(path)
        except Exception:  # a quirk that is not DICOM
          continue
        for keyword, value in PHI_MARKERS.items():
          setattr(ds, keyword, value)
        ds.PatientID = PHI_PATIENT_ID.format(n=n)
        block = ds.private_block(0x0009, PHI_PRIVATE_CREATOR, create=True)
        block.add_new(0x01, 'PN', PHI_PRIVATE_NAME)
        ds.save_as(path)


def _contour_path(root: str, original_id: str, kind: str, k: int) -> str:
  return os.path.join(
    root,
    layout.CONTOUR_DIR,
    original_id,
    f'{kind}-contours',
    layout.contour_name(kind, k),
  )


def _relative(root: str, path: str) -> str:
  return os.path.relpath(path, root).replace(os.sep, '/')


def _drop_slice(manifest: Manifest, root: str, pid: str, oid: str, k: int) -> None:
  del manifest.slices[pid, k]
  manifest.errors.append((f'{layout.DICOM_DIR}/{pid}/{k}.dcm', schema.STAGE_DECODE))


def _write_links(path: str, links: list[tuple[str, str]], quirks: set[str]) -> None:
  newline = '\r\n' if 'crlf_links' in quirks else '\n'
  pad = ' ' if 'spaced_links' in quirks else ''
  lines = [f'{pad}patient_id{pad},{pad}original_id{pad}']
  lines += [f'{pad}{pid}{pad},{pad}{oid}{pad}' for pid, oid in links]
  text = newline.join(lines) + newline
  with open(
    path,
    'w',
    encoding='utf-8-sig' if 'bom_links' in quirks else 'utf-8',
    newline='',
  ) as f:
    f.write(text)


def make_builtin_sample(root: str) -> Manifest:
  """(Re)generates the small built-in sample under ``root``.

  Refuses to delete a folder that this generator did not make.
  """
  if os.path.islink(root):  # its target would be removed and rewritten
    raise UsageError(f'{root} is a symbolic link; choose another --sample-dir')
  if os.path.exists(root):
    if not os.path.exists(os.path.join(root, MARKER_FILE)):
      raise UsageError(
        f'{root} exists and was not made by the sample generator; '
        'choose another --sample-dir'
      )
    shutil.rmtree(root)
  return make_tree(root, patients=3, slices=24, rows=128, columns=128)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('root', help='folder to create (must be empty)')
  parser.add_argument('--patients', type=int, default=3)
  parser.add_argument('--slices', type=int, default=24)
  parser.add_argument('--rows', type=int, default=128)
  parser.add_argument('--columns', type=int, default=128)
  parser.add_argument('--contour-every', type=int, default=3)
  parser.add_argument(
    '--quirks',
    nargs='*',
    default=(),
    help=f'any of {", ".join(QUIRKS)}, or all',
  )
  args = parser.parse_args(argv)
  try:
    manifest = make_tree(
      args.root,
      args.patients,
      args.slices,
      args.rows,
      args.columns,
      args.contour_every,
      args.quirks,
    )
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  pipe.out(
    f'{args.root}: {len(manifest.slices)} slices, '
    f'{sum(e.labeled for e in manifest.slices.values())} labeled'
  )
  return 0


if __name__ == '__main__':
  sys.exit(pipe.run(main))
