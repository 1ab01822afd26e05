"""cardiac-mri export: the dataset as NIfTI volumes in the nnU-Net raw layout.

``cardiac-mri export OUT DEST [--version N] [--exclude-flags a,b]
[--layout nnunet] [--dataset-name Dataset001_CardiacMRI] [--overwrite]``

Writes one case per patient, series and phase (``volumes``), in nnU-Net v2's
raw layout under ``DEST/<dataset-name>/``: ``imagesTr/<case>_0000.nii.gz``
and ``labelsTr/<case>.nii.gz`` for the train and val splits (labeled phases
only), ``imagesTs/`` (and ``labelsTs/`` when labeled) for the test split, and
``dataset.json``. Labels: 0 background, 1 blood pool, 2 myocardium, 3 ignore
(pixels the drawn contours do not decide, and every pixel of an unlabeled
slice). A case is named ``<patient_id>_s<series rank>_p<phase>``: no UID or
other header value. A series with problems is not exported but listed.
The folder is written beside its place and renamed into it at the end.

Exit 0; 3 when a series with problems was left out; 2 on a usage error
(nibabel missing, DEST/<dataset-name> not empty without --overwrite, OUT not
a pipeline output). Needs nibabel (an optional extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable

import numpy as np

from beam_pipeline import dataset
from beam_pipeline.dataset import geometry, labels, volumes
from beam_pipeline.tools import pipe
from transforms.contract.errors import UsageError

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_LEFT_OUT = 3

LAYOUTS = ('nnunet',)
DEFAULT_NAME = 'Dataset001_CardiacMRI'
IGNORE = 3  # nnU-Net v2's "ignore" label: the highest label
LABELS = {**labels.NAMES, 'ignore': IGNORE}
FILE_ENDING = '.nii.gz'
TRAINING_SPLITS = ('train', 'val')  # nnU-Net cross-validates within these
_DATASET_NAME = re.compile(r'Dataset[0-9]{3}_[A-Za-z0-9_-]+')


@dataclasses.dataclass
class Summary:
  """What an export wrote and left out."""

  folder: str
  volumes: int = 0  # series with at least one case written
  training: int = 0  # cases in imagesTr
  test: int = 0  # cases in imagesTs
  test_labeled: int = 0  # of those, with labelsTs
  unlabeled: int = 0  # training-split phases without any contour: not written
  # (patient_id, series rank, problem) of each series left out
  problems: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)

  @property
  def cases(self) -> int:
    return self.training + self.test

  @property
  def left_out(self) -> int:
    """Series not exported for their problems."""
    return len({(pid, series) for pid, series, _ in self.problems})


def nifti_affine(affine: np.ndarray) -> np.ndarray:
  """The RAS affine for the index (column, row, z) (NIfTI's x, y, z) of a
  volume whose LPS ``affine`` is for the index (z, row, column)."""
  return geometry.to_ras(affine[:, [2, 1, 0, 3]])


def nifti_data(array: np.ndarray) -> np.ndarray:
  """A (z, row, column) array as NIfTI data, indexed (column, row, z)."""
  return np.transpose(array, (2, 1, 0))


def case_id(volume: volumes.Volume, phase: int) -> str:
  """``<patient_id>_s<series rank>_p<phase>``, e.g. ``SCD0000101_s0_p03``."""
  return f'{volume.patient_id}_s{volume.series}_p{phase:02d}'


def dataset_json(training: int) -> dict:
  """nnU-Net v2's dataset.json for ``training`` cases in imagesTr."""
  return {
    'channel_names': {'0': 'MRI'},
    'labels': LABELS,
    'numTraining': training,
    'file_ending': FILE_ENDING,
  }


def _nibabel():
  try:
    import nibabel
  except ImportError as e:
    raise UsageError(
      'export needs nibabel, an optional extra: pip install nibabel'
    ) from e
  return nibabel


def _write_nifti(nibabel, path: str, data: np.ndarray, affine: np.ndarray) -> None:
  """One .nii.gz: data indexed (x, y, z), qform and sform both ``affine``
  (scanner frame), millimetres, no text in the header."""
  image = nibabel.Nifti1Image(data, affine)
  image.set_sform(affine, code='scanner')
  image.set_qform(affine, code='scanner')
  header = image.header
  header.set_xyzt_units('mm')
  for field in ('descrip', 'aux_file', 'intent_name', 'db_name'):
    header[field] = b''
  nibabel.save(image, path)


def _target(destination: str, name: str, overwrite: bool) -> str:
  """``destination/name``, checked: absent, empty, or ``overwrite``.

  Raises:
    UsageError: a bad name, a file there, or a non-empty folder.
  """
  if not _DATASET_NAME.fullmatch(name):
    raise UsageError(
      f'--dataset-name must be DatasetNNN_Name (three digits, then letters, '
      f'digits, _ or -), as nnU-Net v2 wants, got {name!r}'
    )
  target = os.path.join(destination, name)
  if os.path.exists(target) and not os.path.isdir(target):
    raise UsageError(f'{target} exists and is not a folder')
  if os.path.isdir(target) and os.listdir(target) and not overwrite:
    raise UsageError(f'{target} is not empty (--overwrite replaces it)')
  return target


def export(
  output: str,
  destination: str,
  *,
  version: int | None = None,
  exclude_flags: Iterable[str] = (),
  dataset_name: str = DEFAULT_NAME,
  overwrite: bool = False,
  progress: Callable[[str], None] | None = None,
) -> Summary:
  """Writes the nnU-Net raw dataset ``destination/dataset_name`` (module
  docstring), whole or not at all.

  Args:
    output: a pipeline output folder.
    destination: the folder to hold the dataset folder (created if absent).
    version: the dataset version (default: the latest).
    exclude_flags: quality flags whose slices are dropped before stacking.
    dataset_name: nnU-Net's DatasetNNN_Name.
    overwrite: replace a non-empty ``destination/dataset_name``.
    progress: called with a line after each patient.

  Raises:
    UsageError: nibabel missing, a bad name or flag, or the target not empty.
    FileNotFoundError, DatasetError: ``output`` is not a readable output.
  """
  nibabel = _nibabel()
  target = _target(destination, dataset_name, overwrite)
  patients = volumes.patient_ids(output, version)
  try:
    found = volumes.volumes(
      output,
      patients,
      version=version,
      exclude_flags=exclude_flags,
      labels=True,
      ignore=IGNORE,
    )
  except ValueError as e:
    raise UsageError(str(e)) from e
  os.makedirs(destination, exist_ok=True)
  partial = os.path.join(destination, f'.{dataset_name}.partial-{os.getpid()}')
  shutil.rmtree(partial, ignore_errors=True)
  summary = Summary(target)
  try:
    for folder in ('imagesTr', 'labelsTr'):  # the folders nnU-Net requires
      os.makedirs(os.path.join(partial, folder))
    rank = {pid: n for n, pid in enumerate(patients)}
    current = None
    for volume in found:
      if volume.patient_id != current and current is not None and progress:
        progress(_progress(summary, rank[volume.patient_id], len(patients)))
      current = volume.patient_id
      _export_volume(nibabel, volume, partial, summary)
    if progress:
      progress(_progress(summary, len(patients), len(patients)))
    with open(os.path.join(partial, 'dataset.json'), 'w') as f:
      json.dump(dataset_json(summary.training), f, indent=2)
      f.write('\n')
    _publish(partial, target)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  return summary


def _progress(summary: Summary, done: int, patients: int) -> str:
  return f'export: {done} of {patients} patients read, {summary.cases} case(s) written'


def _export_volume(nibabel, volume: volumes.Volume, folder: str, summary: Summary):
  """Writes each phase of a volume as a case, or records its problems."""
  if volume.problems:
    summary.problems += [(volume.patient_id, volume.series, p) for p in volume.problems]
    return
  affine = nifti_affine(volume.affine)
  training = volume.split in TRAINING_SPLITS
  written = 0
  for phase in range(volume.phases):
    labeled = volume.labeled(phase)
    if training and not labeled:
      summary.unlabeled += 1
      continue
    case = case_id(volume, phase)
    images, labels = ('imagesTr', 'labelsTr') if training else ('imagesTs', 'labelsTs')
    _write_nifti(
      nibabel,
      _path(folder, images, f'{case}_0000{FILE_ENDING}'),
      nifti_data(volume.image[phase]),
      affine,
    )
    if labeled:
      _write_nifti(
        nibabel,
        _path(folder, labels, f'{case}{FILE_ENDING}'),
        nifti_data(volume.labels[phase]),
        affine,
      )
    written += 1
    if training:
      summary.training += 1
    else:
      summary.test += 1
      summary.test_labeled += int(labeled)
  summary.volumes += written > 0


def _path(folder: str, subfolder: str, name: str) -> str:
  """``folder/subfolder/name``, the subfolder created if absent."""
  os.makedirs(os.path.join(folder, subfolder), exist_ok=True)
  return os.path.join(folder, subfolder, name)


def _publish(partial: str, target: str) -> None:
  """Renames ``partial`` to ``target``, replacing what is there."""
  if os.path.isdir(target) and not os.listdir(target):
    os.rmdir(target)
  if not os.path.exists(target):
    os.rename(partial, target)
    return
  old = f'{partial}.old'
  os.rename(target, old)
  os.rename(partial, target)
  shutil.rmtree(old)


class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line (UsageError), not a usage."""

  def error(self, message: str):
    raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument('destination', help='the folder to write the dataset folder in')
  parser.add_argument(
    '--version',
    type=int,
    help='the dataset version to read (default: the latest; see cardiac-mri history)',
  )
  parser.add_argument(
    '--exclude-flags',
    default='',
    help='comma-separated quality flags whose slices are dropped before stacking '
    '(a dropped slice inside a stack leaves its series out as a missing slice)',
  )
  parser.add_argument('--layout', choices=LAYOUTS, default='nnunet')
  parser.add_argument(
    '--dataset-name',
    default=DEFAULT_NAME,
    help=f'the nnU-Net dataset folder, DatasetNNN_Name (default {DEFAULT_NAME})',
  )
  parser.add_argument(
    '--overwrite', action='store_true', help='replace a non-empty dataset folder'
  )
  return parser


def main(argv: list[str] | None = None) -> int:
  try:
    args = _parser().parse_args(argv)
    flags = [f.strip() for f in args.exclude_flags.split(',') if f.strip()]
    summary = export(
      args.output,
      args.destination,
      version=args.version,
      exclude_flags=flags,
      dataset_name=args.dataset_name,
      overwrite=args.overwrite,
      progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
  except (UsageError, OSError, dataset.DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  for pid, series, problem in summary.problems:
    pipe.out(f'left out: {pid} series {series}: {problem}')
  if summary.problems:
    pipe.out(
      f'{summary.left_out} series left out for {len(summary.problems)} problem(s)'
    )
  pipe.out(
    f'{summary.folder}: {summary.volumes} volume(s) written as {summary.cases} '
    f'case(s) ({summary.training} training, {summary.test} test, '
    f'{summary.test_labeled} of them labeled); skipped: {summary.left_out} '
    f'series with problems, {summary.unlabeled} unlabeled training phase(s)'
  )
  return EXIT_LEFT_OUT if summary.problems else EXIT_OK


if __name__ == '__main__':
  sys.exit(pipe.run(main))
