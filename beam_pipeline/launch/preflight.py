"""Checks before launch: what the input holds, whether the output can take
the dataset, and which mode the local runner should use.

Everything here runs in the launching process before the pipeline starts, so
a problem costs one line and exit 2 (``UsageError``), not a failed job:

- :func:`survey` counts the slices of a local tree (a walk of ``dicoms/`` and
  ``contourfiles/``, bounded in time) and estimates the dataset's size from a
  few slices' headers.
- :func:`check_output` proves the output writable by writing a probe file (a
  local folder, or an object under ``s3://``/``gs://``: the bucket is reachable
  with the given credentials), and compares the estimate with the free space,
  counting as free the staging folders of runs no longer running (the run
  removes them before it writes); a refusal names what holds the space.
- :func:`choose_direct_mode` picks in-process or worker processes for the
  DirectRunner from the slice count and the cores, unless the user chose.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import uuid
import warnings
import zlib
from typing import NamedTuple

from beam_pipeline.launch import lock, publish
from transforms import settings
from transforms.contract import layout
from transforms.contract.errors import InputError, UsageError, causes
from transforms.io import dicomweb, files, stores

_LOG = logging.getLogger(__name__)

SCAN_SECONDS = 5.0  # the walk stops here; its count is then a lower bound
_HEADER_SAMPLES = 8  # slices whose headers give the estimate of a row's size
_ROW_OVERHEAD = 512  # metadata columns, quality columns, Parquet framing
_RATIO_SAMPLE = 4 * 1024 * 1024  # bytes of a sample file compressed for the estimate
# The most of a sample slice read (and, deflated, inflated) for its header:
# every image tag comes before the pixels, within the first few KB.
_HEADER_BYTES = 1024 * 1024
WARN_FRACTION = 0.8  # warn when the estimate takes more of the free space

# The DirectRunner's crossover: the in-process rate, each worker process's
# rate and what the processes cost to start, fitted by bench/crossover.py
# (BENCHMARKS.md).
IN_PROCESS_RATE = 3650.0
WORKER_RATE = 2800.0
WORKER_START_SECONDS = 1.8
MAX_WORKERS = 16


class Survey(NamedTuple):
  """What a local tree holds, found before launch."""

  slices: int  # files at dicoms/<patient_id>/<n>.dcm of linked patients
  labeled: int  # distinct (original_id, slice) pairs of linked patients
  bytes_per_slice: int  # estimated size of one written row
  complete: bool  # False: the walk hit SCAN_SECONDS, the counts are lower bounds
  # (newest change time of any of its files in ns, slices) per linked patient
  patients: tuple[tuple[int, int], ...] = ()

  def rows(self, labeled_only: bool) -> int:
    return min(self.slices, self.labeled) if labeled_only else self.slices

  def changed_since(self, ns: int) -> Survey:
    """The survey of the patients with a file changed since ``ns`` (an
    incremental run decodes about those: the runner's mode is chosen for
    them)."""
    since = ns - layout.RACY_NS
    slices = sum(n for newest, n in self.patients if newest >= since)
    return self._replace(slices=slices, labeled=min(self.labeled, slices))

  def dataset_bytes(self, labeled_only: bool) -> int:
    return self.rows(labeled_only) * self.bytes_per_slice


def _walk(root: str, top: str, deadline: float):
  """(path, change time in ns) of the files below ``root/top``, the path
  relative to ``root`` ('/'-separated); stops at ``deadline``. Symlinks are
  not followed; unreadable folders are skipped (the pipeline's own listing
  reports them)."""
  pending = [top]
  while pending and time.monotonic() < deadline:
    relative = pending.pop()
    try:
      with os.scandir(os.path.join(root, relative)) as entries:
        for entry in entries:
          path = f'{relative}/{entry.name}'
          if entry.is_dir(follow_symlinks=False):
            pending.append(path)
          elif entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            yield path, max(st.st_mtime_ns, st.st_ctime_ns)
    except OSError:
      continue
  if pending:
    raise TimeoutError


def check_dicomweb(config: dicomweb.DicomWebConfig, root: str) -> None:
  """Reads the credentials and runs one search on the PACS, so that a wrong
  URL, certificate or credential is one line before anything runs.

  Raises:
    UsageError: the auth file is unusable, or the server cannot be reached or
      refuses the search.
  """
  try:
    dicomweb.client(config).check()
  except dicomweb.DicomWebError as e:
    if e.status in (401, 403):
      raise UsageError(
        f'--dicomweb-url {config.url}: the server refused the credentials '
        f'(HTTP {e.status}); see docs/SOURCES.md, "From a PACS"'
      ) from None
    raise UsageError(f'--dicomweb-url {config.url}: {e}') from None
  folder = stores.join(root, layout.DICOM_DIR)
  if (
    os.path.isdir(folder)
    if stores.is_local(folder)
    else next(iter(stores.store(folder).files(folder)), None) is not None
  ):
    _LOG.warning(
      '%s is ignored: the slices come from --dicomweb-url %s', folder, config.url
    )


def survey(
  root: str, image_codec: str = 'none', max_pixels: int = settings.DEFAULT_MAX_PIXELS
) -> Survey | None:
  """Counts the slices and labelled slices of the linked patients (link.csv's
  rows, as the pipeline parses them) of the local tree at ``root``, and
  estimates a row's size with the image column in ``image_codec``
  (``--image-codec``), from a few slices' headers (``max_pixels``:
  ``--max-pixels``). Every read is bounded: link.csv as the listing reads it,
  a header from the first MiB of its file (see :func:`image_size`).

  Returns None for a tree on an object store (not walked twice there).
  """
  if not stores.is_local(root):
    return None
  try:  # as the listing reads it: a larger file is one row there, no link
    data = files.read_input(root, layout.LINK_FILE, layout.MAX_LINK_BYTES)
    links, _ = layout.parse_links(data)
  except (OSError, InputError):
    links = []
  patients = {link.patient_id for link in links}
  patient_of = {link.original_id: link.patient_id for link in links}
  deadline = time.monotonic() + SCAN_SECONDS
  slices, labeled, samples = 0, set(), []
  newest: dict[str, int] = {}
  count: dict[str, int] = {}
  complete = True
  try:
    for top in (layout.DICOM_DIR, layout.CONTOUR_DIR):
      for path, changed in _walk(root, top, deadline):
        file = layout.classify_path(path)
        if isinstance(file, layout.DicomFile) and file.patient_id in patients:
          slices += 1
          pid = file.patient_id
          count[pid] = count.get(pid, 0) + 1
          if len(samples) < _HEADER_SAMPLES and file.slice_index == 1:
            samples.append(os.path.join(root, path))
        elif isinstance(file, layout.ContourFile) and file.original_id in patient_of:
          labeled.add((file.original_id, file.slice_index))
          pid = patient_of[file.original_id]
        else:
          continue
        newest[pid] = max(newest.get(pid, 0), changed)
  except TimeoutError:
    complete = False
  return Survey(
    slices,
    len(labeled),
    _row_bytes(samples, image_codec, max_pixels),
    complete,
    tuple((newest[pid], n) for pid, n in count.items()),
  )


def _row_bytes(
  paths: list[str], image_codec: str, max_pixels: int = settings.DEFAULT_MAX_PIXELS
) -> int:
  """The mean size of a written row, from the headers of ``paths``: the
  image, two bit-packed masks and the other columns. The image is its raw
  size times what ``image_codec`` makes of the whole file (for an
  uncompressed slice, mostly its pixels; a compressed one stays near its raw
  size, an upper bound). A header beyond ``max_pixels`` (``--max-pixels``)
  counts for nothing: the decode stage refuses that slice."""
  sizes = []
  for path in paths:
    try:
      rows, columns, samples, bits = image_size(path)
    except Exception:  # an unreadable header: the pipeline reports it
      continue
    pixels = rows * columns
    if pixels * samples > max_pixels:
      continue
    image = int(pixels * samples * bits // 8 * _compressed_fraction(path, image_codec))
    sizes.append(image + 2 * pixels // 8 + _ROW_OVERHEAD)
  return int(sum(sizes) / len(sizes)) if sizes else _ROW_OVERHEAD


def image_size(path: str) -> tuple[int, int, int, int]:
  """(Rows, Columns, SamplesPerPixel, BitsAllocated) of the slice at
  ``path``, read from its first _HEADER_BYTES bytes only; a deflated data
  set is inflated to at most _HEADER_BYTES, in one bounded step (the decode
  stage bounds its own inflation, and refuses a bomb as that slice's one
  row). pydicom never sees the whole file: it would inflate a deflated one
  whole, whatever it holds.

  Raises:
    Exception: of any type, for a header that cannot be read.
  """
  import pydicom
  from pydicom.filereader import read_dataset, read_preamble

  with open(path, 'rb') as f:
    head = f.read(_HEADER_BYTES)
  with warnings.catch_warnings(), _lenient(pydicom.config):
    warnings.simplefilter('ignore')  # a UID with leading zeros, and such
    data = io.BytesIO(head)
    read_preamble(data, False)  # raises without the DICM prefix
    meta = read_dataset(data, False, True, stop_when=lambda tag, vr, n: tag.group != 2)
    syntax = meta.get('TransferSyntaxUID')
    body = head[data.tell() :]
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
      body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, _HEADER_BYTES)
    ds = read_dataset(
      io.BytesIO(body),
      syntax == pydicom.uid.ImplicitVRLittleEndian,
      syntax != pydicom.uid.ExplicitVRBigEndian,
      stop_when=lambda tag, vr, n: tag.group > 0x0028,  # past the image tags
      specific_tags=[0x00280002, 0x00280010, 0x00280011, 0x00280100],
    )
    return (
      int(ds.Rows),
      int(ds.Columns),
      int(ds.get('SamplesPerPixel', 1)),
      int(ds.BitsAllocated),
    )


@contextlib.contextmanager
def _lenient(config):
  """pydicom reading values as they are, without validating (and logging)
  each: as the decode stage reads them."""
  saved = config.settings.reading_validation_mode
  config.settings.reading_validation_mode = config.IGNORE
  try:
    yield
  finally:
    config.settings.reading_validation_mode = saved


def _compressed_fraction(path: str, image_codec: str) -> float:
  """What ``image_codec`` leaves of the file at ``path`` (at most 1), from
  its first _RATIO_SAMPLE bytes (a hostile file may be huge)."""
  name, level = settings.parse_image_codec(image_codec)
  if name == 'none':
    return 1.0
  import pyarrow as pa

  with open(path, 'rb') as f:
    data = f.read(_RATIO_SAMPLE)
  if not data:
    return 1.0
  compressed = pa.Codec(name, compression_level=level).compress(data)
  return min(1.0, len(compressed) / len(data))


def human_bytes(n: float) -> str:
  for unit in ('bytes', 'KB', 'MB', 'GB', 'TB'):
    if n < 1000 or unit == 'TB':
      return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1000
  raise AssertionError('unreachable')


def check_output(output: str, needed: int | None, space_check: bool = True) -> None:
  """Raises UsageError unless ``output`` can take a dataset of ``needed`` bytes.

  Locally the output must be, or become, a folder in which a file can be
  written; with ``space_check`` a dataset larger than the free space is
  refused and one near it warned about. The staging folders that runs no
  longer running left (a run that filled the disk leaves its own) count as
  free: the run removes them before it writes; a live run's never do, and a
  refusal names the folders, their size and who holds them. On an object
  store, a probe object is written under the staging prefix and deleted: the
  bucket exists and the credentials may write. The previous dataset is not
  touched.
  """
  if stores.is_local(output):
    _check_local(output, needed if space_check else None)
  else:
    _check_remote(output)


def _check_local(output: str, needed: int | None) -> None:
  if os.path.exists(output) and not os.path.isdir(output):
    raise UsageError(f'--output {output} is a file, not a folder')
  made = []
  folder = output
  while not os.path.exists(folder):
    made.append(folder)
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise UsageError(f'--output {output}: {folder} is a file, not a folder')
  try:
    os.makedirs(output, exist_ok=True)
    probe = os.path.join(output, f'.write-probe-{uuid.uuid4().hex}')
    new = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW  # never a link's target
    with os.fdopen(os.open(probe, new, 0o600), 'wb') as f:
      f.write(b'probe')
    os.remove(probe)
  except OSError as e:
    _remove_made(made)
    raise UsageError(f'--output {output} is not writable: {_cause(e)}') from e
  if needed is None:
    return
  free = shutil.disk_usage(output).free
  if needed <= WARN_FRACTION * free:
    return
  left = leftovers(output)  # only near the limit: it walks the staging folders
  usable = free + left.freed
  if needed > usable:
    _remove_made(made)
    raise UsageError(
      f'--output {output}: the dataset needs about {human_bytes(needed)} and '
      f'{human_bytes(free)} is free there{left.describe(free)}; '
      f'{left.advice(output)}free some space, choose another --output, or pass '
      '--skip-space-check'
    )
  if left.freed:
    _LOG.info(
      'the dataset needs about %s and %s is free at %s, %s with the staging '
      'folders of runs no longer running, which are removed before it is written',
      human_bytes(needed),
      human_bytes(free),
      output,
      human_bytes(usable),
    )
  if needed > WARN_FRACTION * usable:
    _LOG.warning(
      'the dataset needs about %s, %s of the %s free at %s',
      human_bytes(needed),
      f'{needed / usable:.0%}',
      human_bytes(usable),
      output,
    )


class Leftovers(NamedTuple):
  """The staging folders in a local output (``OUT/_incomplete-<run id>/``)
  and the disk space they hold."""

  folders: tuple[str, ...]
  bytes: int
  # The run holding the output's lock (lock.holder); None: no run is alive
  # there, so every folder is a dead run's, removed as the next run starts.
  holder: str | None = None

  @property
  def freed(self) -> int:
    """The bytes this run frees before it writes: the folders' when no run
    holds the lock, else none (never a live run's folder)."""
    return self.bytes if self.folders and self.holder is None else 0

  def describe(self, free: int) -> str:
    """What holds the space, for a refusal ('' when no folder is there);
    ``free``: the bytes free on the disk."""
    if not self.folders:
      return ''
    shown = ', '.join(self.folders[:3])
    if len(self.folders) > 3:
      shown += f' and {len(self.folders) - 3} more'
    held = human_bytes(self.bytes)
    if self.holder is not None:
      folders = 'folder' if len(self.folders) == 1 else 'folders'
      return (
        f'; {held} more is held by the staging {folders} {shown} while another '
        f'run uses this output ({self.holder})'
      )
    runs = (
      'the staging folder of a run'
      if len(self.folders) == 1
      else f'the staging folders of {len(self.folders)} runs'
    )
    return (
      f' ({human_bytes(free + self.bytes)} counting the {held} that {runs} no '
      f'longer running left, {shown}, which a run removes as it starts)'
    )

  def advice(self, output: str) -> str:
    """What to do about them first ('' when nothing)."""
    if not self.folders:
      return ''
    if self.holder is None:
      them = 'it' if len(self.folders) == 1 else 'them'
      return f'remove {them} now with `cardiac-mri vacuum {output}`, '
    return 'wait for that run to finish, '


def leftovers(output: str) -> Leftovers:
  """The staging folders in the local folder ``output``, the disk space
  their files hold, and the live run holding the output's lock, if any."""
  folders = tuple(publish.staging_folders(output))
  if not folders:
    return Leftovers((), 0)
  return Leftovers(folders, sum(_disk_bytes(f) for f in folders), lock.holder(output))


def _disk_bytes(top: str) -> int:
  """The disk space of the files below ``top`` (blocks, which is what
  removing them frees), links not followed, unreadable folders skipped."""
  total = 0
  pending = [top]
  while pending:
    try:
      with os.scandir(pending.pop()) as entries:
        for entry in entries:
          if entry.is_dir(follow_symlinks=False):
            pending.append(entry.path)
          else:
            found = entry.stat(follow_symlinks=False)
            total += getattr(found, 'st_blocks', 0) * 512 or found.st_size
    except OSError:
      continue
  return total


def _remove_made(made: list[str]) -> None:
  """Removes the (empty) folders this check created, deepest first."""
  for folder in made:
    try:
      os.rmdir(folder)
    except OSError:
      pass


def _check_remote(output: str) -> None:
  probe = stores.join(output, f'.write-probe-{uuid.uuid4().hex}')
  try:
    stores.write_bytes(probe, b'probe')
    stores.store(probe).delete([probe])
  except Exception as e:
    raise UsageError(f'--output {output} is not writable: {_cause(e)}') from e


def _cause(e: BaseException) -> str:
  """The innermost cause of ``e`` in one line."""
  e = causes(e)[-1]
  if isinstance(e, OSError) and e.strerror:
    return e.strerror
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


def cores() -> int:
  """CPUs this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def crossover(workers: int) -> float:
  """Slices above which ``workers`` processes beat one in-process runner."""
  gain = 1 / IN_PROCESS_RATE - 1 / (WORKER_RATE * workers)
  return WORKER_START_SECONDS / gain if workers > 1 and gain > 0 else float('inf')


class DirectMode(NamedTuple):
  """The DirectRunner's mode: 'in_memory' (in-process) or 'multi_processing'."""

  running_mode: str
  workers: int
  reason: str

  def describe(self) -> str:
    if self.running_mode == 'multi_processing':
      return f'{self.workers} worker processes ({self.reason})'
    return f'in-process ({self.reason})'


def choose_direct_mode(survey: Survey | None, cpus: int) -> DirectMode:
  """In-process below the crossover for ``cpus`` cores, else one worker
  process per core (at most MAX_WORKERS)."""
  workers = min(cpus, MAX_WORKERS)
  if survey is None:
    return DirectMode(
      'in_memory', 1, 'slice count not known ahead: an object store or a PACS'
    )
  count = f'{survey.slices:,}{"" if survey.complete else "+"} slices'
  limit = crossover(workers)
  if workers < 2:
    return DirectMode('in_memory', 1, f'{count}, 1 core')
  if survey.slices < limit:
    return DirectMode(
      'in_memory', 1, f'{count} < {limit:,.0f}, the crossover for {workers} cores'
    )
  return DirectMode(
    'multi_processing',
    workers,
    f'{count} >= {limit:,.0f}, the crossover for {workers} cores',
  )
