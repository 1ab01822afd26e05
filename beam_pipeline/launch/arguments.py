"""The pipeline's own command-line options: declarations, defaults, checks.

Beam-free on purpose: ``--help`` is answered from here without importing
Beam, pydicom or pyarrow (``beam_pipeline.launch.cli``), and ``IngestOptions``
(``beam_pipeline.launch.options``) registers the same declarations with Beam.
"""

from __future__ import annotations

import argparse
import os

from transforms import settings
from transforms.contract import splits
from transforms.contract.errors import UsageError
from transforms.io import dicomweb, protocol

DEFAULT_OUTPUT = 'output'
DEFAULT_SAMPLE_DIR = 'sample_data'
# One Arrow binary column holds at most 2 GiB; a row group's images stay well
# under it (one more image may join a full group).
MAX_CHUNK_BYTES = 1024 * 1024 * 1024
HELP_BEAM = '--help-beam'


# Option groups, in the order --help shows them.
INPUT_OUTPUT = 'input and output'
BEHAVIOUR = 'behaviour'
PERFORMANCE = 'performance'
QA = 'quality assurance'


def _image_codec(spec: str) -> str:
  try:
    settings.parse_image_codec(spec)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return spec


def _add(group, *flags: str, help: str, shown: str | None = None, **kwargs) -> None:
  """One option, its help ending with its default (``off`` for a switch;
  ``shown`` when the default is None only to tell whether it was given)."""
  if shown is None and kwargs.get('action') == 'store_true':
    shown = 'off'
  elif shown is None:
    shown = 'none' if kwargs.get('default') is None else '%(default)s'
  group.add_argument(*flags, help=f'{help} (default: {shown})', **kwargs)


def add_input_output(parser: argparse.ArgumentParser) -> None:
  """The input tree, the output, the PACS, the id map."""
  io = parser.add_argument_group(INPUT_OUTPUT)
  _add(
    io,
    '--input',
    default=None,
    help='Data tree holding link.csv, dicoms/ and contourfiles/ (a local path, '
    'or any path Beam FileSystems reads). Without it the pipeline runs on a '
    'small built-in sample generated into --sample-dir.',
  )
  _add(
    io,
    '--output',
    default=DEFAULT_OUTPUT,
    help='Where the Delta tables slices/, reconciliation/ and errors/ are '
    'written; a run adds a version.',
  )
  _add(
    io,
    '--overwrite',
    action='store_true',
    help='Add a version made from another --input to the dataset in --output, '
    'or replace an output of the layout before schema 3 (the previous data stays '
    'intact until the new version is committed). A run of the same --input adds '
    'a version without it.',
  )
  _add(
    io,
    '--full',
    action='store_true',
    help='Decode every patient again, as one new version. Without it, a run '
    'into an existing dataset of the same --input decodes only the patients '
    'whose files or link.csv row changed, and keeps the rows of the others.',
  )
  _add(
    io,
    '--sample-dir',
    dest='sample_dir',
    default=DEFAULT_SAMPLE_DIR,
    help='Where the built-in sample is generated when --input is not given.',
  )
  _add(
    io,
    '--skip-space-check',
    dest='skip_space_check',
    action='store_true',
    help='Launch even when the estimated dataset size exceeds the free space '
    'at a local --output (the estimate compresses sampled files with '
    '--image-codec).',
  )
  _add(
    io,
    '--dicomweb-url',
    dest='dicomweb_url',
    default=None,
    help='Take the DICOM slices from this DICOMweb service root (a PACS, e.g. '
    "http://127.0.0.1:8042/dicom-web) instead of --input's dicoms/: "
    "link.csv's patient_id is the PatientID, slice n the instance whose "
    'InstanceNumber is n. Credentials come from DICOMWEB_USERNAME and '
    'DICOMWEB_PASSWORD, or DICOMWEB_TOKEN, or --dicomweb-auth-file.',
  )
  _add(
    io,
    '--dicomweb-auth-file',
    dest='dicomweb_auth_file',
    default=None,
    help='JSON file with {"username": ..., "password": ...} or {"token": ...} '
    'for --dicomweb-url; refused if its group or every user may read or write '
    'it, or if '
    'it is a symbolic link or not a regular file.',
  )
  _add(
    io,
    '--dicomweb-ca-bundle',
    dest='dicomweb_ca_bundle',
    default=None,
    help='CA certificates (PEM) that verify an https --dicomweb-url (default: '
    "the system's); verification is never turned off.",
  )
  _add(
    io,
    '--series-filter',
    dest='series_filter',
    default=None,
    help='KEYWORD=PATTERN choosing the series of each patient on the PACS, '
    'KEYWORD one of SeriesDescription, SeriesNumber, Modality, '
    'SeriesInstanceUID; PATTERN is shell-style (*, ?), case ignored. A '
    'patient with several matching series is reported ambiguous_series.',
  )
  _add(
    io,
    '--id-map',
    dest='id_map',
    default=None,
    help='With --pseudonymize-key-file: write the table of every original id, '
    'name and UID and its pseudonym to this local CSV file (mode 600), never '
    'inside --output. Keep it apart from the dataset.',
  )


def add_behaviour(parser: argparse.ArgumentParser) -> None:
  """What is written, flagged, pseudonymised or refused."""
  behaviour = parser.add_argument_group(BEHAVIOUR)
  _add(
    behaviour,
    '--pseudonymize-key-file',
    dest='pseudonymize_key_file',
    default=None,
    help='Replace patient_id, original_id, every UID and every path name that '
    'may carry an id by keyed pseudonyms (HMAC-SHA256) made with the key in '
    'this file (at least 32 bytes, mode 600: not readable by its group or every '
    'user; `cardiac-mri '
    'keygen FILE` makes one). The splits do not change.',
  )
  _add(
    behaviour,
    '--labeled-only',
    dest='labeled_only',
    action='store_true',
    help='Write only slices that have at least one contour file.',
  )
  _add(
    behaviour,
    '--strict',
    action='store_true',
    help='Fail the run (exit 4) when any reconciliation problem or error row is '
    'found; the dataset and reports are still written.',
  )
  _add(
    behaviour,
    '--split',
    default=splits.DEFAULT_FRACTIONS,
    help='train,val,test fractions; each patient goes to one split by a stable '
    'hash of its patient_id, every non-zero split filled in small cohorts, and '
    'a patient already in the dataset keeps its split (docs/TRAINING.md).',
  )
  _add(
    behaviour,
    '--drop-duplicates',
    dest='drop_duplicates',
    action='store_true',
    help='Of the copies of one image (the same SOP Instance UID or identical '
    'pixels), write only the first by path. Without it every copy is written, '
    'flagged duplicate_slice, and patients sharing an image share a split.',
  )
  _add(
    behaviour,
    '--exclude-burned-in',
    dest='exclude_burned_in',
    action='store_true',
    help='Do not write slices whose header says the pixels may show text '
    '(BurnedInAnnotation YES, a SECONDARY/DERIVED/SCREEN SAVE ImageType, a '
    'secondary capture); each is an error row, stage excluded.',
  )
  _add(
    behaviour,
    '--max-pixels',
    dest='max_pixels',
    type=int,
    default=settings.DEFAULT_MAX_PIXELS,
    help='Largest rows x columns x samples per slice; larger images are '
    'rejected from the header, before decoding.',
  )
  _add(
    behaviour,
    '--max-file-bytes',
    dest='max_file_bytes',
    type=int,
    default=settings.DEFAULT_MAX_FILE_BYTES,
    help='Largest input file read, and largest size a deflated DICOM data set '
    'may inflate to; larger ones are error rows, refused before reading or '
    'inflating.',
  )


def add_performance(parser: argparse.ArgumentParser) -> None:
  """Work sizes, concurrency, codecs and limits."""
  performance = parser.add_argument_group(PERFORMANCE)
  _add(
    performance,
    '--chunk-size',
    dest='chunk_size',
    type=int,
    default=settings.DEFAULT_CHUNK_SIZE,
    help='Slices per work item and per Parquet row group.',
  )
  _add(
    performance,
    '--max-chunk-bytes',
    dest='max_chunk_bytes',
    type=int,
    default=settings.DEFAULT_MAX_CHUNK_BYTES,
    help='Decoded image bytes per Parquet row group (at most 1 GiB): a chunk '
    'of larger images is written as several, so a worker stays near 600 MiB '
    'at the default whatever the image size.',
  )
  _add(
    performance,
    '--image-codec',
    dest='image_codec',
    type=_image_codec,
    default=settings.DEFAULT_IMAGE_CODEC,
    metavar='CODEC[:LEVEL]',
    help='Parquet compression of the image column: '
    + ', '.join(settings.IMAGE_CODECS)
    + ', with a level for zstd, gzip and brotli (e.g. zstd:3). zstd:2 keeps '
    "the dataset no larger than the plain script's; none (raw bytes) writes "
    'and reads back fastest, at 1.75x the size (BENCHMARKS.md). The masks '
    'are zstd, the small columns LZ4.',
  )
  _add(
    performance,
    '--decode-in-process',
    dest='decode_in_process',
    action='store_true',
    help='Decode every DICOM in the worker process itself. By default '
    'uncompressed slices are read in the worker by a small native reader and '
    'the rest (compressed, unusual) are decoded by pydicom in a child process, '
    'so a decoder crash or hang costs one slice (an error row), not the run.',
  )
  _add(
    performance,
    '--decoders',
    type=int,
    default=settings.DEFAULT_DECODERS,
    help='Decoder child processes per worker (isolated decoding only); each '
    'decodes ahead while the worker rasterises and writes.',
  )
  _add(
    performance,
    '--decode-timeout',
    dest='decode_timeout',
    type=float,
    default=settings.DEFAULT_DECODE_TIMEOUT,
    help='Seconds one DICOM file may take to decode before it is given up (an '
    'error row); not applied with --decode-in-process.',
  )
  _add(
    performance,
    '--progress-seconds',
    dest='progress_seconds',
    type=float,
    default=settings.DEFAULT_PROGRESS_SECONDS,
    help='Seconds between two progress lines (slices done of the total, '
    'slices/s, ETA) when stderr is not a terminal; a terminal gets one live '
    'bar instead.',
  )
  _add(
    performance,
    '--read-concurrency',
    dest='read_concurrency',
    type=int,
    default=protocol.DEFAULT_READ_CONCURRENCY,
    help='Requests in flight per worker while reading files from an object '
    'store (s3://, gs://) or instances from --dicomweb-url, so waiting on the '
    'network overlaps with decoding.',
  )
  _add(
    performance,
    '--request-attempts',
    dest='request_attempts',
    type=int,
    default=protocol.DEFAULT_ATTEMPTS,
    help='Attempts per object-store or DICOMweb request before the file counts '
    'as failed (an error row): throttling (503 SlowDown, 429) and transient errors are '
    'retried with exponential backoff and jitter.',
  )
  _add(
    performance,
    '--dicomweb-page-size',
    dest='dicomweb_page_size',
    type=int,
    default=dicomweb.DEFAULT_PAGE_SIZE,
    help='Instances asked for per QIDO-RS search page (limit/offset) on '
    '--dicomweb-url; lower it for a server that caps its answers.',
  )
  _add(
    performance,
    '--dicomweb-retrieve',
    dest='dicomweb_retrieve',
    choices=dicomweb.RETRIEVE_MODES,
    default=None,
    shown=dicomweb.SERIES,
    help="How slices are retrieved from --dicomweb-url: series (a patient's "
    'series in one WADO-RS request, its instances held within '
    '--max-chunk-bytes; what it does not bring is retrieved alone) or '
    'instance (one request per instance, --chunk-size slices a work item).',
  )


def add_quality_assurance(parser: argparse.ArgumentParser) -> None:
  """What is checked and shown after the run."""
  qa = parser.add_argument_group(QA)
  _add(
    qa,
    '--qa-dir',
    dest='qa_dir',
    default=None,
    help='After the run, write one contact sheet PNG per patient and an '
    'index.html with the quality flags here (reads the output back, so '
    '--output must be a local path).',
  )


# The groups in the order --help shows them; each is one PipelineOptions
# class of beam_pipeline.launch.options.
GROUPS = (add_input_output, add_behaviour, add_performance, add_quality_assurance)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Declares the pipeline's own options on ``parser``, in four groups."""
  for add in GROUPS:
    add(parser)


def validate(values) -> None:
  """Raises UsageError (a ValueError) on invalid values, before any launch.

  Args:
    values: the parsed options (IngestOptions or an argparse Namespace).
  """
  if values.chunk_size < 1:
    raise UsageError(f'--chunk-size must be at least 1, got {values.chunk_size}')
  if values.max_pixels < 1:
    raise UsageError(f'--max-pixels must be at least 1, got {values.max_pixels}')
  if values.max_file_bytes < 1:
    raise UsageError(
      f'--max-file-bytes must be at least 1, got {values.max_file_bytes}'
    )
  if not 1 <= values.max_chunk_bytes <= MAX_CHUNK_BYTES:
    raise UsageError(
      f'--max-chunk-bytes must be between 1 and {MAX_CHUNK_BYTES}, got '
      f'{values.max_chunk_bytes}'
    )
  if values.decoders < 1:
    raise UsageError(f'--decoders must be at least 1, got {values.decoders}')
  for flag in ('read_concurrency', 'request_attempts', 'dicomweb_page_size'):
    if getattr(values, flag) < 1:
      raise UsageError(
        f'--{flag.replace("_", "-")} must be at least 1, got {getattr(values, flag)}'
      )
  if values.decode_timeout <= 0:
    raise UsageError(f'--decode-timeout must be positive, got {values.decode_timeout}')
  if values.progress_seconds < 0:
    raise UsageError(
      f'--progress-seconds must not be negative, got {values.progress_seconds}'
    )
  splits.parse_fractions(values.split)
  _validate_dicomweb(values)
  if values.id_map is not None and values.pseudonymize_key_file is None:
    raise UsageError('--id-map needs --pseudonymize-key-file')
  if not values.output:
    raise UsageError('--output must not be empty')
  for flag in ('input', 'output', 'sample_dir', 'qa_dir', 'id_map'):
    path = getattr(values, flag)
    try:
      (path or '').encode('utf-8')
    except UnicodeEncodeError:
      escaped = path.encode('utf-8', 'surrogateescape').decode(
        'utf-8', 'backslashreplace'
      )
      raise UsageError(
        f'--{flag.replace("_", "-")} {escaped} is not valid UTF-8: rename it, or '
        'use a link with a UTF-8 name'
      ) from None


def _validate_dicomweb(values) -> None:
  if values.dicomweb_url is None:
    for flag in (
      'dicomweb_auth_file',
      'dicomweb_ca_bundle',
      'series_filter',
      'dicomweb_retrieve',
    ):
      if getattr(values, flag) is not None:
        raise UsageError(f'--{flag.replace("_", "-")} needs --dicomweb-url')
    return
  bundle = values.dicomweb_ca_bundle
  if bundle is not None and not os.path.isfile(bundle):
    raise UsageError(f'--dicomweb-ca-bundle {bundle} is not a file')


def help_parser(prog: str = 'run_pipeline.py') -> argparse.ArgumentParser:
  """A parser of the pipeline's own options, for ``--help``: the four groups
  first, then help itself."""
  parser = argparse.ArgumentParser(
    prog=prog,
    add_help=False,
    description='Turns a cardiac-MRI data tree (link.csv, dicoms/, '
    'contourfiles/) into a Parquet dataset. With no options it runs on a '
    'built-in sample.',
    epilog='Every standard Apache Beam pipeline option passes through as well '
    '(--runner, --direct_num_workers, --direct_running_mode, ...): '
    f'{HELP_BEAM} lists them; docs/SOURCES.md, "Other runners", shows '
    'how to use them.',
  )
  add_arguments(parser)
  help_group = parser.add_argument_group('help')
  help_group.add_argument('-h', '--help', action='help', help='Show this help.')
  help_group.add_argument(
    HELP_BEAM, action='store_true', help="List Apache Beam's own pipeline options."
  )
  return parser
