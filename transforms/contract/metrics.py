"""Counter names, what counts as an issue, and which issues dropped an input.

All counters live in one Beam metrics namespace, NAMESPACE. The stages count
what happens; the application reads the counters back when the run ends for
the summary, the run record of the version and the exit code; ``verify`` checks the
output against them.
"""

from __future__ import annotations

from collections.abc import Mapping

from transforms.contract import schema

NAMESPACE = 'cardiac_mri'

PATIENTS_DONE = 'patients_done'
SLICES_WRITTEN = 'slices_written'
I_MASKS_WRITTEN = 'i_masks_written'
O_MASKS_WRITTEN = 'o_masks_written'
MASKS_WRITTEN = {'i': I_MASKS_WRITTEN, 'o': O_MASKS_WRITTEN}
SLICE_BYTES_READ = 'dicom_bytes_read'
STRAY_FILES = 'stray_files'
PACS_INSTANCES_FOUND = 'pacs_instances_found'  # by the DICOMweb searches
# Instances fetched from a series' retrieve, and one by one; series retrieves
# that ended before bringing all they were asked for.
PACS_INSTANCES_STREAMED = 'pacs_instances_streamed'
PACS_INSTANCES_RETRIEVED = 'pacs_instances_retrieved'
PACS_SERIES_INCOMPLETE = 'pacs_series_incomplete'
PACS_FETCHES = (
  PACS_INSTANCES_STREAMED,
  PACS_INSTANCES_RETRIEVED,
  PACS_SERIES_INCOMPLETE,
)

_QA_PREFIX = 'qa_'


def reconciliation_counter(status: str) -> str:
  """The counter of reconciliation rows with ``status``."""
  return f'reconciliation_{status}'


def error_counter(stage: str) -> str:
  """The counter of error rows of ``stage``."""
  return f'errors_{stage}'


def split_patients_counter(split: str) -> str:
  """The counter of patients done in ``split``."""
  return f'patients_{split}'


def split_slices_counter(split: str) -> str:
  """The counter of slices written in ``split``."""
  return f'slices_{split}'


def qa_counter(flag: str) -> str:
  """The counter of slices that raised the quality flag ``flag``."""
  return f'{_QA_PREFIX}{flag}'


def qa_flag_counts(counters: Mapping[str, int]) -> dict[str, int]:
  """{flag: slices} for every quality flag raised at least once."""
  return {
    name.removeprefix(_QA_PREFIX): n
    for name, n in sorted(counters.items())
    if name.startswith(_QA_PREFIX) and n
  }


# The problem rows that stand for an input the run did not use: a run with
# any exits 3 (``beam_pipeline.launch.cli``). Every error row is one (the
# errors table holds the inputs that could not be used, or were left out by
# --exclude-burned-in), and so are the reconciliation rows of these statuses:
# a link row without slices (its contour files unused), a folder no usable
# link row names, a contour file without its slice, a link row that is not
# read, a PACS patient with several series (nothing written for it). The
# other problem rows describe inputs that were written: missing_contours (the
# slices unlabeled), duplicate_contour and duplicate_slice (every copy
# written and flagged), except that under --drop-duplicates a duplicate_slice
# row stands for the copies that were not written.
DROPPED_STATUSES = (
  schema.MISSING_DICOMS,
  schema.UNLINKED_DICOMS,
  schema.UNLINKED_CONTOURS,
  schema.CONTOUR_WITHOUT_DICOM,
  schema.DUPLICATE_LINK,
  schema.MALFORMED_LINK,
  schema.AMBIGUOUS_SERIES,
)
PROBLEM_STATUSES = tuple(s for s in schema.STATUSES if s != schema.MATCHED)


def dropped_statuses(drop_duplicates: bool = False) -> tuple[str, ...]:
  """The reconciliation statuses whose rows stand for an input not used.

  Args:
    drop_duplicates: the run's --drop-duplicates.
  """
  if drop_duplicates:
    return (*DROPPED_STATUSES, schema.DUPLICATE_SLICE)
  return DROPPED_STATUSES


def _rows(counters: Mapping[str, int], statuses: tuple[str, ...]) -> int:
  """Reconciliation rows of ``statuses`` plus every error row."""
  return sum(counters.get(reconciliation_counter(s), 0) for s in statuses) + sum(
    counters.get(error_counter(stage), 0) for stage in schema.STAGES
  )


def issue_count(counters: Mapping[str, int]) -> int:
  """Reconciliation problems plus error rows: 0 for a clean run."""
  return _rows(counters, PROBLEM_STATUSES)


def dropped_count(counters: Mapping[str, int], drop_duplicates: bool = False) -> int:
  """The problem rows that stand for an input the run did not use (error
  rows and the rows of ``dropped_statuses``): 0 when every input was
  written, flagged or not.

  Args:
    counters: the run's counters.
    drop_duplicates: the run's --drop-duplicates.
  """
  return _rows(counters, dropped_statuses(drop_duplicates))
