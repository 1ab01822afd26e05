"""Pipeline assembly: ``build_pipeline`` (the graph) and ``run`` (launch it).

``run`` parses the options, checks the input and output before anything
launches, takes the output's lock (``beam_pipeline.lock``), runs the job into
its own ``OUT/_incomplete-<run id>/``, publishes the dataset only
when the job succeeded (``beam_pipeline.publish``), writes ``_SUMMARY.json``
last and prints the summary. The command line and its exit codes are
``beam_pipeline.cli``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
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

from beam_pipeline import (
  arguments,
  console,
  duplicates,
  interrupts,
  keys,
  lock,
  preflight,
  progress,
  publish,
  qa,
  sample,
  summary,
)
from beam_pipeline.contract import layout, metrics
from beam_pipeline.contract import schema as s
from beam_pipeline.contract.errors import UsageError, causes
from beam_pipeline.options import IngestOptions, check_known
from transforms import stores
from transforms.decode import DecodeSlices
from transforms.duplicates import FindDuplicates
from transforms.listing import ListTree, ReadLinks
from transforms.pacs import SearchPacs
from transforms.reconcile import PACS, TREE, Reconcile
from transforms.write import WriteDataset

_LOG = logging.getLogger(__name__)


def build_pipeline(
  p: beam.Pipeline,
  options: IngestOptions,
  progress_dir: str | None = None,
  run_id: str = 'dry-run',
) -> None:
  """Adds the whole job to ``p``: read, reconcile, decode, write.

  ``options.input`` and ``options.output`` must already be absolute (see
  :func:`resolve_paths`); the job writes into the staging folder. With
  ``progress_dir`` (a local runner), workers keep their counts there for
  ``beam_pipeline.progress``. ``run_id`` names the run's staging folder.
  """
  config = options.store_config()
  pacs = options.dicomweb_config()
  pseudonyms = options.pseudonyms()
  links = p | 'ReadLinks' >> ReadLinks(options.input, config, pseudonyms)
  tops = (layout.CONTOUR_DIR,) if pacs else (layout.DICOM_DIR, layout.CONTOUR_DIR)
  files = p | 'ListTree' >> ListTree(options.input, config, tops, pseudonyms)
  found = {
    Reconcile.LINKS: links[ReadLinks.LINKS],
    Reconcile.CONTOURS: files[ListTree.CONTOURS],
  }
  more_reconciliation, more_errors = [], []  # a PACS search's rows
  if pacs is None:
    found[Reconcile.DICOMS] = files[ListTree.DICOMS]
  else:
    searched = links[ReadLinks.LINKS] | 'SearchPacs' >> SearchPacs(
      pacs, options.parsed_series_filter(), pseudonyms
    )
    found[Reconcile.DICOMS] = searched[SearchPacs.DICOMS]
    found[Reconcile.REPORTED] = searched[SearchPacs.REPORTED]
    more_reconciliation.append(searched[SearchPacs.RECONCILIATION])
    more_errors.append(searched[SearchPacs.ERRORS])
  found = found | 'Reconcile' >> Reconcile(TREE if pacs is None else PACS)
  settings = dataclasses.replace(options.decode_settings(), progress_dir=progress_dir)
  decoded = found[Reconcile.PATIENTS] | 'Decode' >> DecodeSlices(
    options.input, settings
  )
  staging = publish.staging_path(options.output, run_id)
  copies = decoded[DecodeSlices.IDENTITIES] | 'FindDuplicates' >> FindDuplicates(
    stores.join(staging, s.DUPLICATES_PLAN_FILE), options.drop_duplicates, config
  )
  reconciliation = (
    links[ReadLinks.RECONCILIATION],
    found[Reconcile.RECONCILIATION],
    copies,
    *more_reconciliation,
  ) | 'AllReconciliation' >> beam.Flatten()
  errors = (
    links[ReadLinks.ERRORS],
    files[ListTree.ERRORS],
    decoded[DecodeSlices.ERRORS],
    *more_errors,
  ) | 'AllErrors' >> beam.Flatten()
  _ = {
    WriteDataset.SLICES: decoded[DecodeSlices.SLICES],
    WriteDataset.RECONCILIATION: reconciliation,
    WriteDataset.ERRORS: errors,
  } | 'Write' >> WriteDataset(
    staging, options.image_codec, config, options.max_chunk_bytes
  )
  if options.id_map is not None:
    _ = (
      links[ReadLinks.ID_MAP],
      files[ListTree.ID_MAP],
      decoded[DecodeSlices.ID_MAP],
    ) | 'IdMap' >> _WriteIdMap(keys.parts_folder(options.id_map, run_id))


class _WriteIdMap(beam.PTransform):
  """Id-map rows (pseudonyms.Entry), each once, as CSV parts in ``folder``
  (beside --id-map, outside the output; ``keys.assemble_id_map`` joins
  them once the job is done)."""

  def __init__(self, folder: str):
    super().__init__()
    self._folder = folder

  def expand(self, entries):
    return (
      entries
      | 'AllEntries' >> beam.Flatten()
      | 'AsLines' >> beam.Map(keys.entry_line).with_output_types(str)
      | 'Once' >> beam.Distinct()
      | 'WriteParts'
      >> beam.io.WriteToText(f'{self._folder}/part', file_name_suffix='.csv')
    )


def resolve_paths(options: IngestOptions) -> bool:
  """Makes --input/--output absolute, generating the sample if --input is unset.

  Returns:
    Whether a dataset in --output may be replaced (--overwrite, or the default
    output of the built-in sample).

  Raises:
    UsageError: the input is not a data tree, or the output is inside it.
  """
  options.validate_ingest()
  stores.configure(options.store_config())
  overwrite = options.overwrite
  if options.input is None:
    options.input = publish.absolute(options.sample_dir)
    # The default output of the built-in sample is the sample's to replace:
    # the quick start can run again. Any other output needs --overwrite.
    overwrite = overwrite or (
      options.output == arguments.DEFAULT_OUTPUT
      and publish.made_from(publish.absolute(options.output)) == options.input
    )
    manifest = sample.make_builtin_sample(options.input)
    print(
      f'No --input given: generated the built-in sample at '
      f'{options.input} ({len(manifest.slices)} slices).'
    )
  options.input = publish.absolute(options.input).rstrip('/')
  options.output = publish.absolute(options.output).rstrip('/')
  link_file = stores.join(options.input, layout.LINK_FILE)
  if not stores.store(link_file).exists(link_file):
    raise UsageError(
      f'--input {options.input} is not a data tree: {link_file} not found'
    )
  if options.qa_dir is not None:
    if not stores.is_local(options.output) or not stores.is_local(options.qa_dir):
      raise UsageError('--qa-dir needs a local --output and a local --qa-dir')
    options.qa_dir = publish.absolute(options.qa_dir)
  if options.output == options.input or options.output.startswith(options.input + '/'):
    raise UsageError('--output must not be inside --input')
  if options.id_map is not None:
    _check_id_map(options, overwrite)
  return overwrite


def _check_id_map(options: IngestOptions, overwrite: bool) -> None:
  """--id-map is a local file outside --output (and --input), in an
  existing folder; one already there is replaced only with --overwrite."""
  if not stores.is_local(options.id_map):
    raise UsageError(f'--id-map {options.id_map} must be a local file')
  options.id_map = publish.absolute(options.id_map)
  for root, name in ((options.output, '--output'), (options.input, '--input')):
    if options.id_map == root or options.id_map.startswith(root.rstrip('/') + '/'):
      raise UsageError(
        f'--id-map {options.id_map} is inside {name}: the id map re-identifies '
        'the dataset, so it is kept apart from it'
      )
  folder = os.path.dirname(options.id_map)
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
    raise UsageError(f'--id-map {options.id_map}: {folder} is not a writable folder')
  if os.path.isdir(options.id_map):
    raise UsageError(f'--id-map {options.id_map} is a folder, not a file')
  if os.path.exists(options.id_map) and not overwrite:
    raise UsageError(f'--id-map {options.id_map} exists: add --overwrite to replace it')


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


def _dry_run(options: PipelineOptions, ingest: IngestOptions) -> Run:
  """Builds and translates the job (e.g. DataflowRunner --dry_run) without I/O.

  Nothing is read, listed, generated or published: the input and output need
  not exist, nor be reachable from here.
  """
  ingest.validate_ingest()
  if ingest.input is None:
    raise UsageError('--dry_run needs an explicit --input')
  ingest.input = publish.absolute(ingest.input).rstrip('/')
  ingest.output = publish.absolute(ingest.output).rstrip('/')
  p = beam.Pipeline(options=options)
  build_pipeline(p, ingest)
  result = p.run()
  print(
    f'Dry run: the job graph for {ingest.input} was built and translated; '
    'nothing was submitted, read or written.'
  )
  return Run(result, {}, ingest, dry_run=True)


def run(argv: Sequence[str] | None = None) -> Run:
  """Parses options, runs the job, waits, publishes, prints the summary.

  Raises:
    UsageError: an unknown option, invalid values or input, before anything
      launches.
    RuntimeError: the job did not finish DONE; nothing was published.
  """
  argv = list(argv or [])
  check_known(argv)
  options = PipelineOptions(argv)
  ingest = options.view_as(IngestOptions)
  if options.view_as(TestOptions).dry_run:
    return _dry_run(options, ingest)
  overwrite = resolve_paths(ingest)
  publish.check_replaceable(ingest.output, overwrite)
  pacs = ingest.dicomweb_config()
  if pacs is None:
    found = preflight.survey(ingest.input, ingest.image_codec)
  else:  # nothing to count ahead: the slices are on the server
    preflight.check_dicomweb(pacs, ingest.input)
    found = None
  needed = found.dataset_bytes(ingest.labeled_only) if found else None
  preflight.check_output(ingest.output, needed, not ingest.skip_space_check)
  run_id = lock.new_run_id()
  with lock.hold(ingest.output, run_id), _id_map_parts(ingest.id_map, run_id):
    publish.check_replaceable(ingest.output, overwrite)  # again, under the lock
    return _launch(options, argv, ingest, found, run_id)


@contextlib.contextmanager
def _id_map_parts(id_map: str | None, run_id: str):
  """Whatever happens, no part of the id map is left beside it."""
  try:
    yield
  finally:
    if id_map is not None:
      shutil.rmtree(keys.parts_folder(id_map, run_id), ignore_errors=True)


def _launch(
  options: PipelineOptions,
  argv: list[str],
  ingest: IngestOptions,
  found: preflight.Survey | None,
  run_id: str,
) -> Run:
  """Runs the job into its own staging folder and publishes it (the caller
  holds the output's lock)."""
  described = choose_direct_mode(options, argv, found)
  _LOG.info('reading %s, writing %s; runner %s', ingest.input, ingest.output, described)
  publish.clear_staging(ingest.output)
  runner = _runner(options)  # None: not the DirectRunner, no shared folder
  start = time.monotonic()
  p = beam.Pipeline(runner=runner, options=options)
  total = found.rows(ingest.labeled_only) if found and found.complete else None
  shown = progress.Reporter(total, ingest.progress_seconds)
  with shown if runner is not None else contextlib.nullcontext() as reporter:
    build_pipeline(p, ingest, reporter.folder if reporter else None, run_id)
    with _naming_output(publish.staging_path(ingest.output, run_id)):
      result = p.run()
      result.wait_until_finish()
  if result.state != PipelineState.DONE:
    raise RuntimeError(
      f'the pipeline ended in state {result.state}; nothing was published to '
      f'{ingest.output}'
    )
  seconds = time.monotonic() - start
  totals = summary.counters(result)
  dropped = duplicates.apply_plan(
    publish.staging_path(ingest.output, run_id), totals, ingest.image_codec
  )
  with interrupts.deferred():  # all of the new dataset, or the old one
    files = publish.take_manifests(ingest.output, run_id)
    outputs = publish.publish(ingest.output, run_id, files)
    outputs['summary'] = summary.write_summary(
      ingest.output,
      totals,
      seconds,
      publish.recorded(files),
      input=ingest.input,
      labeled_only=ingest.labeled_only,
      strict=ingest.strict,
      drop_duplicates=ingest.drop_duplicates,
      dropped_duplicates=dropped,
      pseudonymized=ingest.pseudonymize_key_file is not None,
    )
  if ingest.id_map is not None:
    rows = keys.assemble_id_map(keys.parts_folder(ingest.id_map, run_id), ingest.id_map)
    outputs['id map'] = f'{ingest.id_map} ({rows} rows; keep it apart from the dataset)'
  if ingest.qa_dir is not None:
    outputs['qa'] = qa.write_qa(ingest.output, ingest.qa_dir)
  print(
    summary.summary_text(
      totals, outputs, seconds, output=ingest.output, split=ingest.split
    )
  )
  for empty in summary.empty_splits(totals):  # the summary has shown it
    _LOG.warning(
      'split %s is empty at --split %s', empty, ingest.split, extra=console.FILE_ONLY
    )
  return Run(result, totals, ingest)
