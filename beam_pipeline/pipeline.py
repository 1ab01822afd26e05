"""Pipeline assembly: ``build_pipeline`` (the graph) and ``run`` (launch it).

Exit codes of ``main``:

  0  the run completed and every input was used;
  3  the run completed, and some inputs are in OUT/errors or OUT/reconciliation
     has problem rows (the good slices are written);
  4  as 3, with --strict: the run counts as failed (the reports are written);
  2  invalid options or input (nothing was launched);
  1  the pipeline failed (crash): OUT/_SUMMARY.json is not written.

The job writes into OUT/_incomplete/ and moves the finished dataset into
place only when it succeeded, writing OUT/_SUMMARY.json last: a killed run
leaves any previous dataset untouched, and OUT/_SUMMARY.json exists only
beside a complete dataset.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (
  PipelineOptions,
  StandardOptions,
  TestOptions,
)
from apache_beam.runners.runner import PipelineResult, PipelineState

from beam_pipeline import layout, qa, report, sample, splits
from beam_pipeline import schema as s
from beam_pipeline.errors import UsageError
from beam_pipeline.options import IngestOptions
from transforms import _files
from transforms.decode import DecodeSlicesFn, PlanChunksFn
from transforms.reconcile import Reconcile
from transforms.write import WriteDataset

_LOG = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_QUARANTINED = 3
EXIT_STRICT = 4

_DATA_ENTRIES = (s.SLICES_DIR, s.RECONCILIATION_DIR, s.ERRORS_DIR)
_OUTPUT_ENTRIES = (*_DATA_ENTRIES, s.SUMMARY_FILE)


def staging_path(output: str) -> str:
  """Where a run writes before its dataset is moved into ``output``."""
  return FileSystems.join(output, s.STAGING_DIR)


def build_pipeline(p: beam.Pipeline, options: IngestOptions) -> None:
  """Adds the whole job to ``p``: reconcile, decode, write.

  ``options.input`` and ``options.output`` must already be absolute (see
  :func:`resolve_paths`).
  """
  found = p | 'Reconcile' >> Reconcile(options.input)
  decoded = (
    found['patients']
    | 'PlanChunks' >> beam.ParDo(PlanChunksFn(options.chunk_size, options.labeled_only))
    | 'FanOut' >> beam.Reshuffle()
    | 'DecodeSlices'
    >> beam.ParDo(
      DecodeSlicesFn(
        options.input,
        options.max_pixels,
        splits.parse_fractions(options.split),
        isolate=not options.decode_in_process,
        decode_timeout=options.decode_timeout,
        decoders=options.decoders,
        progress_seconds=options.progress_seconds,
      )
    ).with_outputs(DecodeSlicesFn.ERRORS, main='slices')
  )
  errors = (found['errors'], decoded[DecodeSlicesFn.ERRORS]) | (
    'AllErrors' >> beam.Flatten()
  )
  _ = {
    'slices': decoded.slices,
    'reconciliation': found['reconciliation'],
    'errors': errors,
  } | 'Write' >> WriteDataset(staging_path(options.output), options.image_codec)


def _absolute(path: str) -> str:
  return path if not _files.is_local(path) else os.path.abspath(path)


def resolve_paths(options: IngestOptions) -> None:
  """Makes --input/--output absolute, generating the sample if --input is unset.

  Raises:
    UsageError: the input is not a data tree, or the output holds a dataset
      and --overwrite is not set.
  """
  options.validate_ingest()
  if options.input is None:
    options.input = _absolute(options.sample_dir)
    manifest = sample.make_builtin_sample(options.input)
    print(
      f'No --input given: generated the built-in sample at '
      f'{options.input} ({len(manifest.slices)} slices).'
    )
  options.input = _absolute(options.input).rstrip('/')
  options.output = _absolute(options.output).rstrip('/')
  link_file = FileSystems.join(options.input, layout.LINK_FILE)
  if not FileSystems.exists(link_file):
    raise UsageError(
      f'--input {options.input} is not a data tree: {link_file} not found'
    )
  if options.qa_dir is not None:
    if not _files.is_local(options.output) or not _files.is_local(options.qa_dir):
      raise UsageError('--qa-dir needs a local --output and a local --qa-dir')
    options.qa_dir = os.path.abspath(options.qa_dir)
  if options.output == options.input or options.output.startswith(options.input + '/'):
    raise UsageError('--output must not be inside --input')
  existing = [
    FileSystems.join(options.output, entry)
    for entry in _OUTPUT_ENTRIES
    if _files.exists(FileSystems.join(options.output, entry))
  ]
  if existing and not options.overwrite:
    raise UsageError(
      f'--output {options.output} already holds a dataset '
      f'({", ".join(os.path.basename(e) for e in existing)}); pass '
      '--overwrite to replace it, or choose another --output'
    )
  staging = staging_path(options.output)
  if _files.exists(staging):
    _LOG.warning('removing %s, left by an interrupted run', staging)
    _files.delete_tree(staging)


def _publish(output: str) -> None:
  """Moves the staged dataset into ``output``, replacing any previous one.

  The old summary goes first and the new one is written after this, so a
  crash part-way never leaves a dataset that looks complete.
  """
  staging = staging_path(output)
  summary = FileSystems.join(output, s.SUMMARY_FILE)
  if FileSystems.exists(summary):
    FileSystems.delete([summary])
  for entry in _DATA_ENTRIES:
    old = FileSystems.join(output, entry)
    if _files.exists(old):
      _files.delete_tree(old)
  staged = _files.list_files(staging)
  targets = [output + path[len(staging) :] for path in staged]
  if _files.is_local(output):  # object stores have no folders to make
    for entry in _DATA_ENTRIES:
      FileSystems.mkdirs(FileSystems.join(output, entry))
  FileSystems.rename(staged, targets)
  _files.delete_tree(staging)


def counters(result: PipelineResult) -> dict[str, int]:
  """The project's counters, summed over steps (committed where available)."""
  totals: dict[str, int] = {}
  query = result.metrics().query(MetricsFilter().with_namespace(report.NAMESPACE))
  for counter in query['counters']:
    value = counter.committed if counter.committed is not None else (counter.attempted)
    name = counter.key.metric.name
    totals[name] = totals.get(name, 0) + (value or 0)
  return totals


def _write_summary(
  options: IngestOptions, totals: dict[str, int], seconds: float
) -> str:
  path = FileSystems.join(options.output, s.SUMMARY_FILE)
  summary = {
    'schema_version': s.SCHEMA_VERSION,
    'beam_version': beam.__version__,
    'input': options.input,
    'labeled_only': options.labeled_only,
    'strict': options.strict,
    'issues': report.issue_count(totals),
    'seconds': round(seconds, 3),
    'counters': dict(sorted(totals.items())),
  }
  with FileSystems.create(path) as f:
    f.write(json.dumps(summary, indent=2).encode() + b'\n')
  return path


def _dry_run(options: PipelineOptions, ingest: IngestOptions) -> PipelineResult:
  """Builds and translates the job (e.g. DataflowRunner --dry_run) without I/O.

  Nothing is read, listed, generated or published: the input and output need
  not exist, nor be reachable from here.
  """
  ingest.validate_ingest()
  if ingest.input is None:
    raise UsageError('--dry_run needs an explicit --input')
  ingest.input = _absolute(ingest.input).rstrip('/')
  ingest.output = _absolute(ingest.output).rstrip('/')
  p = beam.Pipeline(options=options)
  build_pipeline(p, ingest)
  result = p.run()
  print(
    f'Dry run: the job graph for {ingest.input} was built and translated; '
    'nothing was submitted, read or written.'
  )
  return result


def run(argv: Sequence[str] | None = None) -> PipelineResult:
  """Parses options, runs the job, waits, prints the summary.

  Raises:
    UsageError: invalid options or input, before anything launches.
  """
  options = PipelineOptions(argv)
  ingest = options.view_as(IngestOptions)
  standard = options.view_as(StandardOptions)
  if standard.runner is None:
    standard.runner = 'DirectRunner'
  FileSystems.set_options(options)  # object stores need their options here too
  if options.view_as(TestOptions).dry_run:
    return _dry_run(options, ingest)
  resolve_paths(ingest)
  _LOG.info(
    'reading %s, writing %s, runner %s',
    ingest.input,
    ingest.output,
    standard.runner,
  )
  start = time.monotonic()
  p = beam.Pipeline(options=options)
  build_pipeline(p, ingest)
  result = p.run()
  result.wait_until_finish()
  if result.state != PipelineState.DONE:
    raise RuntimeError(
      f'the pipeline ended in state {result.state}; nothing was published to '
      f'{ingest.output}'
    )
  seconds = time.monotonic() - start
  totals = counters(result)
  _publish(ingest.output)
  outputs = {entry: FileSystems.join(ingest.output, entry) for entry in _DATA_ENTRIES}
  outputs['summary'] = _write_summary(ingest, totals, seconds)
  if ingest.qa_dir is not None:
    outputs['qa'] = qa.write_qa(ingest.output, ingest.qa_dir)
  print(report.summary_text(totals, outputs, seconds))
  return result


def _configure_logging() -> None:
  logging.basicConfig(
    level=logging.INFO,
    stream=sys.stderr,
    format='%(asctime)s %(levelname)s %(name)s: %(message)s',
    force=True,
  )
  # Beam logs every stage at INFO; keep the console to our own lines, also
  # those of worker processes (progress), which Beam relays.
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  report.show_worker_logs()


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the exit code (see module docstring)."""
  _configure_logging()
  try:
    result = run(argv)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except Exception:
    _LOG.exception('the pipeline failed')
    return EXIT_FAILED
  options = PipelineOptions(argv)
  if options.view_as(TestOptions).dry_run:
    return EXIT_OK
  if report.issue_count(counters(result)):
    return EXIT_STRICT if options.view_as(IngestOptions).strict else EXIT_QUARANTINED
  return EXIT_OK
