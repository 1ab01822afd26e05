"""Running the job: ``run`` (the command line's ``run``) from start to summary.

``run`` resolves the options once into frozen settings, checks the input and
output before anything launches, takes the output's lock (``lock``), runs the
job (``beam_pipeline.pipeline``) into its own ``OUT/_incomplete-<run id>/``,
commits it as a new version of the Delta tables only when the job succeeded
(``publish``), and prints the summary. The command line and its exit
codes are ``cli``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import NamedTuple

import apache_beam as beam
from apache_beam.options.pipeline_options import (
  DirectOptions,
  PipelineOptions,
  StandardOptions,
  TestOptions,
)
from apache_beam.runners.runner import PipelineResult, PipelineState

from beam_pipeline.launch import (
  console,
  duplicate_plan,
  incremental,
  interrupts,
  lock,
  preflight,
  progress,
  publish,
  summary,
)
from beam_pipeline.launch.options import IngestOptions, Resolved, check_known
from beam_pipeline.pipeline import Job, build_pipeline
from beam_pipeline.tools import keys, pipe, qa, sample
from transforms.contract import layout, metrics, splits
from transforms.contract.errors import UsageError, causes
from transforms.io import stores

_LOG = logging.getLogger(__name__)


class Paths(NamedTuple):
  """The run's paths, absolute, checked before anything launches."""

  input: str
  output: str
  qa_dir: str | None = None
  id_map: str | None = None
  # Whether a dataset in output may be replaced (--overwrite, or the
  # default output of the built-in sample).
  overwrite: bool = False


def resolve_paths(ingest: IngestOptions) -> Paths:
  """The run's paths: --input and --output made absolute (the built-in
  sample generated if --input is unset), --qa-dir and --id-map checked.

  Raises:
    UsageError: the input is not a data tree, or the output is inside it.
  """
  overwrite = ingest.overwrite
  if ingest.input is None:
    input_root = publish.absolute(ingest.sample_dir)
    manifest = sample.make_builtin_sample(input_root)
    pipe.out(
      f'No --input given: generated the built-in sample at '
      f'{input_root} ({len(manifest.slices)} slices).'
    )
  else:
    input_root = ingest.input
  input_root = publish.absolute(input_root).rstrip('/')
  output = publish.absolute(ingest.output).rstrip('/')
  link_file = stores.join(input_root, layout.LINK_FILE)
  if not stores.store(link_file).exists(link_file):
    raise UsageError(f'--input {input_root} is not a data tree: {link_file} not found')
  qa_dir = ingest.qa_dir
  if qa_dir is not None:
    if not stores.is_local(output) or not stores.is_local(qa_dir):
      raise UsageError('--qa-dir needs a local --output and a local --qa-dir')
    qa_dir = publish.absolute(qa_dir)
    qa.check_qa_dir(qa_dir)  # a link planted where a folder goes: refused
  if output == input_root or output.startswith(input_root + '/'):
    raise UsageError('--output must not be inside --input')
  paths = Paths(input_root, output, qa_dir, None, overwrite)
  if ingest.id_map is not None:
    paths = paths._replace(id_map=_checked_id_map(ingest.id_map, paths))
  return paths


def _checked_id_map(id_map: str, paths: Paths) -> str:
  """--id-map, absolute: a local file outside --output (and --input), in an
  existing folder; one already there is replaced only with --overwrite."""
  if not stores.is_local(id_map):
    raise UsageError(f'--id-map {id_map} must be a local file')
  id_map = publish.absolute(id_map)
  for root, name in ((paths.output, '--output'), (paths.input, '--input')):
    if id_map == root or id_map.startswith(root.rstrip('/') + '/'):
      raise UsageError(
        f'--id-map {id_map} is inside {name}: the id map re-identifies '
        'the dataset, so it is kept apart from it'
      )
  folder = os.path.dirname(id_map)
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
    raise UsageError(f'--id-map {id_map}: {folder} is not a writable folder')
  keys.check_id_map(id_map, paths.overwrite)  # a link, a FIFO, a folder: refused
  return id_map


def row_settings(ingest: IngestOptions, settings: Resolved) -> dict:
  """The options that change rows: a version made with others is not
  continued incrementally (incremental.begin)."""
  decode = settings.decode
  keyed = decode.pseudonyms is not None and decode.pseudonyms.active
  return {
    'labeled_only': decode.labeled_only,
    'exclude_burned_in': decode.exclude_burned_in,
    'max_pixels': decode.max_pixels,
    'max_file_bytes': decode.max_file_bytes,
    'split': list(decode.split_fractions),
    'split_rule': splits.RULE,
    'isolate': decode.isolate,
    'decode_timeout': decode.decode_timeout,
    'drop_duplicates': ingest.drop_duplicates,
    'image_codec': ingest.image_codec,
    'series_filter': list(settings.series_filter or ()),
    'dicomweb': decode.dicomweb.url if decode.dicomweb else None,
    # a pseudonym stands for the key, which is never recorded
    'key': decode.pseudonyms.patient('settings') if keyed else None,
    # another release may decode otherwise: its first run is a full one
    'release': _release(),
  }


def _release() -> str:
  from importlib import metadata

  try:
    return metadata.version('cardiac-mri-beam')
  except metadata.PackageNotFoundError:
    return ''


def job_of(
  ingest: IngestOptions,
  settings: Resolved,
  paths: Paths,
  run_id: str,
  progress_dir: str | None = None,
  start: incremental.Start | None = None,
) -> Job:
  """The graph's frozen settings for this run (``start``: the version it
  continues, if incremental)."""
  staging = publish.staging_path(paths.output, run_id)
  return Job(
    input=paths.input,
    staging=staging,
    decode=dataclasses.replace(settings.decode, progress_dir=progress_dir),
    series_filter=settings.series_filter,
    drop_duplicates=ingest.drop_duplicates,
    image_codec=ingest.image_codec,
    id_map_parts=None
    if paths.id_map is None
    else keys.parts_folder(paths.id_map, run_id),
    previous=None if start is None else incremental.stage_previous(staging, start),
    pinned=None
    if start is None
    else incremental.stage_pinned(staging, start, settings.decode.split_fractions),
    old_files=() if start is None else incremental.old_slice_files(paths.output, start),
  )


_DIRECT_FLAGS = ('--direct_running_mode', '--direct_num_workers')


def choose_direct_mode(
  options: PipelineOptions, argv: Sequence[str], found: preflight.Survey | None
) -> str:
  """Sets the DirectRunner's mode from the slice count, unless the command
  line chose it; returns the runner's description for the first log line."""
  standard = options.view_as(StandardOptions)
  if standard.runner not in (None, 'DirectRunner'):
    return standard.runner if isinstance(standard.runner, str) else 'a custom runner'
  direct = options.view_as(DirectOptions)
  given = [a.replace('-', '_').split('=')[0] for a in argv]
  if any(flag.replace('-', '_') in given for flag in _DIRECT_FLAGS):
    workers = direct.direct_num_workers
    return f'DirectRunner, {direct.direct_running_mode} x{workers} (as given)'
  mode = preflight.choose_direct_mode(found, preflight.cores())
  direct.direct_running_mode = mode.running_mode
  direct.direct_num_workers = mode.workers
  return f'DirectRunner, {mode.describe()}'


def _runner(options: PipelineOptions):
  """The runner to launch: for the DirectRunner (the default), its FnApiRunner
  engine, built as the DirectRunner builds it.

  Beam's DirectRunner first tries the Prism runner, which downloads a binary:
  offline it fails (leaving an empty beam-temp* folder behind) and falls back
  to the FnApiRunner; online it would run on Prism, which was never measured
  here. Choosing the engine directly makes a run the same everywhere. Any
  other runner, PrismRunner included, is used as given.
  """
  standard = options.view_as(StandardOptions)
  if standard.runner not in (None, 'DirectRunner'):
    return None
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  from apache_beam.runners.portability.portable_runner import JobServiceHandle

  standard.runner = 'DirectRunner'
  encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(
    provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    )
  )


@contextlib.contextmanager
def _naming_output(staging: str):
  """A job failing on an OSError that names no file (a full disk, a quota, a
  file size limit, a read-only remount; the inputs' errors are rows, not
  failures) is re-raised naming the staging folder it was writing."""
  try:
    yield
  except Exception as e:
    chain = causes(e)
    if any(isinstance(x, OSError) and x.filename is not None for x in chain):
      raise
    unnamed = [x for x in chain if isinstance(x, OSError)]
    if not unnamed:
      raise
    raise OSError(unnamed[-1].errno, unnamed[-1].strerror, staging) from e


class Run(NamedTuple):
  """A finished run: Beam's result, the project's counters and the options."""

  result: PipelineResult
  counters: dict[str, int]
  options: IngestOptions
  dry_run: bool = False

  @property
  def issues(self) -> int:
    """Reconciliation problems plus error rows (0 for a clean run)."""
    return metrics.issue_count(self.counters)

  @property
  def dropped(self) -> int:
    """The problem rows that stand for an input not used (0 when every
    input was written, flagged or not)."""
    return metrics.dropped_count(self.counters, self.options.drop_duplicates)


def _dry_run(options: PipelineOptions, ingest: IngestOptions) -> Run:
  """Builds and translates the job (e.g. DataflowRunner --dry_run) without I/O.

  Nothing is read, listed, generated or published: the input and output need
  not exist, nor be reachable from here.
  """
  settings = ingest.resolve()
  if ingest.input is None:
    raise UsageError('--dry_run needs an explicit --input')
  paths = Paths(
    publish.absolute(ingest.input).rstrip('/'),
    publish.absolute(ingest.output).rstrip('/'),
  )
  p = beam.Pipeline(options=options)
  build_pipeline(p, job_of(ingest, settings, paths, 'dry-run'))
  result = p.run()
  pipe.out(
    f'Dry run: the job graph for {paths.input} was built and translated; '
    'nothing was submitted, read or written.'
  )
  return Run(result, {}, ingest, dry_run=True)


def run(argv: Sequence[str] | None = None, started: float | None = None) -> Run:
  """Parses options, runs the job, waits, publishes, prints the summary.

  Args:
    argv: the command line's options.
    started: when the command started (``time.monotonic()``), for the
      summary's wall time; None: now.

  Raises:
    UsageError: an unknown option, invalid values or input, before anything
      launches.
    RuntimeError: the job did not finish DONE; nothing was published.
    AfterPublishing: a step after the commit failed; the version is
      published, and the message says so.
  """
  started = time.monotonic() if started is None else started
  argv = list(argv or [])
  check_known(argv)
  options = PipelineOptions(argv)
  ingest = options.view_as(IngestOptions)
  if options.view_as(TestOptions).dry_run:
    return _dry_run(options, ingest)
  settings = ingest.resolve()
  stores.configure(settings.decode.store)  # with a key: logs redacted from here
  paths = resolve_paths(ingest)
  publish.check_replaceable(paths.output, paths.overwrite, paths.input)
  if settings.decode.dicomweb is None:
    found = preflight.survey(
      paths.input, ingest.image_codec, settings.decode.max_pixels
    )
  else:  # nothing to count ahead: the slices are on the server
    preflight.check_dicomweb(settings.decode.dicomweb, paths.input)
    found = None
  needed = found.dataset_bytes(ingest.labeled_only) if found else None
  preflight.check_output(paths.output, needed, not ingest.skip_space_check)
  run_id = lock.new_run_id()
  with lock.hold(paths.output, run_id), _id_map_parts(paths, run_id) as map_run:
    publish.check_replaceable(
      paths.output, paths.overwrite, paths.input
    )  # again, under the lock
    version, record, committed = publish.start_of(paths.output)
    start = incremental.begin(
      version,
      record,
      committed,
      paths.input,
      incremental.settings_digest(row_settings(ingest, settings)),
      ingest.full,
      paths.id_map is not None,
      frozenset(incremental.to_retry(paths.output, record)),
    )
    return _launch(
      options, argv, ingest, settings, paths, found, run_id, start, started, map_run
    )


@dataclasses.dataclass
class _MapRun:
  """What ``_id_map_parts`` must know of the run when it ends: whether its
  dataset was published (set by ``_launch`` the moment the commit returns)."""

  published: bool = False


@contextlib.contextmanager
def _id_map_parts(paths: Paths, run_id: str):
  """Holds --id-map for the run (``keys.lock_path``: a second run of the
  same map is refused), clears what killed runs of it left, and makes the
  job's parts folder; yields a ``_MapRun``. Whatever happens, no part is
  left beside the map, and no staged map unless the dataset was published:
  then the staged map is what ``keys.put_id_map`` could not put anywhere
  else (it said where), the only copy of the published dataset's map."""
  id_map = paths.id_map
  map_run = _MapRun()
  if id_map is None:
    yield map_run
    return
  with lock.hold_file(keys.lock_path(id_map), run_id, f'--id-map {id_map}', 'id map'):
    keys.check_id_map(id_map, paths.overwrite)  # again, under the lock
    keys.remove_leftovers(id_map, run_id)
    try:
      keys.make_parts(id_map, run_id)
      yield map_run
    finally:
      keys.remove_run_files(id_map, run_id, published=map_run.published)


class AfterPublishing(RuntimeError):
  """A step after the commit failed (writing the QA page): the new version
  is published and complete, and the message says so (exit 1)."""


def _published(
  paths: Paths, version: int, staged: keys.StagedMap | None, said_of_map: str | None
) -> str:
  """What a failure or interrupt after the commit says of the dataset and
  of where its id map is."""
  said = f'version {version} of {paths.output} is published and complete'
  if staged is None:
    return said
  if said_of_map is None:  # never put: it stays where it was staged
    said_of_map = (
      f'{staged.path} ({staged.rows} rows; NOT at {staged.id_map}: move it '
      'there before the next run of this --id-map, which removes it)'
    )
  return f'{said}; its id map: {said_of_map}'


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'.rstrip(': ')


def _launch(
  options: PipelineOptions,
  argv: list[str],
  ingest: IngestOptions,
  settings: Resolved,
  paths: Paths,
  found: preflight.Survey | None,
  run_id: str,
  start: incremental.Start,
  started: float,
  map_run: _MapRun,
) -> Run:
  """Runs the job into its own staging folder and commits it as a new
  version after ``start`` (the caller holds the output's lock); ``started``:
  when the command started; ``map_run``: told when the dataset is published.

  Raises:
    AfterPublishing: a step after the commit failed (writing the QA page):
      the new version is complete, and the message says so and where its id
      map is. An interrupt then is raised marked ``published``.
  """
  if found is not None and start.incremental and start.committed:
    found = found.changed_since(start.committed * 1_000_000)
  described = choose_direct_mode(options, argv, found)
  _LOG.info('reading %s, writing %s; runner %s', paths.input, paths.output, described)
  if start.version is not None:
    _LOG.info(
      'starting from version %d: %s',
      start.version,
      'decoding only the patients whose inputs changed'
      if start.incremental
      else f'decoding every patient ({start.why_full})',
    )
  publish.clear_staging(paths.output)
  publish.make_staging(paths.output, run_id)
  runner = _runner(options)  # None: not the DirectRunner, no shared folder
  began = time.monotonic()
  p = beam.Pipeline(runner=runner, options=options)
  # an incremental run's count is an estimate: no percentage from it
  known = found and found.complete and not start.incremental
  total = found.rows(ingest.labeled_only) if known else None
  reporter = progress.Reporter(total, ingest.progress_seconds)
  with reporter if runner is not None else contextlib.nullcontext() as shared:
    job = job_of(
      ingest, settings, paths, run_id, shared.folder if shared else None, start
    )
    build_pipeline(p, job)
    with _naming_output(job.staging):
      result = p.run()
      result.wait_until_finish()
  if result.state != PipelineState.DONE:
    raise RuntimeError(
      f'the pipeline ended in state {result.state}; nothing was published to '
      f'{paths.output}'
    )
  seconds = time.monotonic() - began
  totals = summary.counters(result)
  plan = duplicate_plan.load_plan(job.staging)
  dropped = duplicate_plan.apply_plan(job.staging, plan, totals, ingest.image_codec)
  decoded = totals.get(metrics.SLICES_WRITTEN, 0)
  if start.incremental:
    _LOG.info('carrying over the unchanged patients of version %d', start.version)
  carried = incremental.carry_over(
    paths.output, job.staging, start, plan, ingest.image_codec, totals
  )
  for pid, n in carried.dropped.items():
    dropped[pid] = dropped.get(pid, 0) + n
  staged_map = None  # staged before publishing: a map made meanwhile stops the run
  if paths.id_map is not None:
    staged_map = keys.stage_id_map(
      job.id_map_parts, paths.id_map, run_id, paths.overwrite
    )
  version = None  # the new version, once committed
  said_of_map = None
  doing = 'publishing'
  failure = None
  try:
    with interrupts.deferred():  # all of the new dataset, or the old one
      files = {**publish.take_manifests(paths.output, run_id), **carried.staged}
      if start.incremental:
        files = incremental.without_empty(files)
      record = summary.run_record(
        totals,
        seconds,
        input=paths.input,
        labeled_only=ingest.labeled_only,
        strict=ingest.strict,
        drop_duplicates=ingest.drop_duplicates,
        dropped_duplicates=dropped,
        pseudonymized=ingest.pseudonymize_key_file is not None,
        **{
          incremental.SETTINGS: incremental.settings_digest(
            row_settings(ingest, settings)
          ),
          incremental.PATIENTS: {
            **carried.patients,
            'from_version': start.version,
            'why_full': start.why_full,
            'slices_decoded': decoded,
          },
          incremental.INPUTS: dict(sorted(carried.fingerprints.items())),
          incremental.SPLITS: dict(sorted(carried.splits.items())),
          incremental.FRACTIONS: list(settings.decode.split_fractions),
        },
      )
      _LOG.info(
        'publishing version %d (%d new files) to %s',
        0 if start.version is None else start.version + 1,
        len(files),
        paths.output,
      )
      version = publish.publish(
        paths.output,
        run_id,
        files,
        record,
        start.version,
        carried.kept_files if start.incremental else None,
        carried.removed if start.incremental else None,
      )
      map_run.published = True  # from here on, the staged map is never removed
      # in place before an interrupt is let through: a published dataset has its map
      if staged_map is not None:
        doing = 'putting the id map in place'
        said_of_map = keys.put_id_map(staged_map, paths.overwrite)
    doing = 'printing the summary'
    outputs = {e: stores.join(paths.output, e) for e in publish.DATA_ENTRIES}
    outputs['version'] = (
      f'{version} (list them with: {summary.history_command(paths.output)})'
    )
    if said_of_map is not None:
      outputs['id map'] = said_of_map
    if paths.qa_dir is not None:
      doing = 'writing the QA page'
      _LOG.info('writing the QA page to %s', paths.qa_dir)
      outputs['qa'] = qa.write_qa(paths.output, paths.qa_dir, version)
      doing = 'printing the summary'
    pipe.out(
      summary.summary_text(
        totals,
        outputs,
        seconds,
        output=paths.output,
        split=ingest.split,
        patients=record[incremental.PATIENTS],
        wall_seconds=time.monotonic() - started,
        drop_duplicates=ingest.drop_duplicates,
        flagged=len(plan.flags),
      )
    )
  except BaseException as e:
    if version is None:  # nothing of this run was published
      raise
    published = _published(paths, version, staged_map, said_of_map)
    stop = interrupts.interrupted_by(e)
    if stop is not None:
      stop.published = True  # the command line's line says so
      _LOG.warning('%s', published)
      raise
    _LOG.error('%s failed after version %d was published', doing, version, exc_info=e)
    failure = AfterPublishing(f'{published}; then {doing} failed: {_one_line(e)}')
  if failure is not None:  # raised here: no other error is its context
    raise failure
  for empty in summary.empty_splits(totals):  # the summary has shown it
    _LOG.warning(
      'split %s is empty at --split %s', empty, ingest.split, extra=console.FILE_ONLY
    )
  return Run(result, totals, ingest)
