"""The pipeline's own options, as Beam PipelineOptions: one class per concern
(input and output, behaviour, performance, quality assurance), and
IngestOptions, the view of all four.

The declarations live in ``beam_pipeline.launch.arguments`` (Beam-free, so that
``--help`` needs no Beam); every standard Beam option passes through too.
``IngestOptions.resolve`` validates them and turns them, once, into the
stages' frozen settings (``Resolved``); nothing reads the options after that.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Sequence

from apache_beam.options.pipeline_options import PipelineOptions, S3Options

from beam_pipeline.launch import arguments
from beam_pipeline.tools import keys
from transforms.contract import splits
from transforms.contract.errors import UsageError
from transforms.contract.pseudonyms import IDENTITY, Pseudonyms
from transforms.io.dicomweb import (
  SERIES,
  DicomWebConfig,
  SeriesFilter,
  check_url,
  parse_series_filter,
)
from transforms.io.protocol import StoreConfig
from transforms.settings import DecodeSettings

# Beam's S3 options that would put a credential on the command line, where a
# runner displays it, and the environment variable that takes its place.
_CREDENTIAL_OPTIONS = {
  's3_access_key_id': 'AWS_ACCESS_KEY_ID',
  's3_secret_access_key': 'AWS_SECRET_ACCESS_KEY',
  's3_session_token': 'AWS_SESSION_TOKEN',
}


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The options, validated and resolved once.

  Attributes:
    decode: the stages' settings, with the store, DICOMweb and pseudonym
      settings inside (the key file read once, here).
    series_filter: --series-filter, parsed (None when not given).
  """

  decode: DecodeSettings
  series_filter: SeriesFilter | None


class InputOutputOptions(PipelineOptions):
  """The input tree, the output, the PACS, the id map."""

  @classmethod
  def _add_argparse_args(cls, parser):
    arguments.add_input_output(parser)


class BehaviourOptions(PipelineOptions):
  """What is written, flagged, pseudonymised or refused."""

  @classmethod
  def _add_argparse_args(cls, parser):
    arguments.add_behaviour(parser)


class PerformanceOptions(PipelineOptions):
  """Work sizes, concurrency, codecs and limits."""

  @classmethod
  def _add_argparse_args(cls, parser):
    arguments.add_performance(parser)


class QualityOptions(PipelineOptions):
  """What is checked and shown after the run."""

  @classmethod
  def _add_argparse_args(cls, parser):
    arguments.add_quality_assurance(parser)


class IngestOptions(
  InputOutputOptions, BehaviourOptions, PerformanceOptions, QualityOptions
):
  """Every option of the pipeline in one view (Beam registers the four
  concerns' classes, one group of --help each); read with ``view_as``."""

  def validate_ingest(self) -> None:
    """Raises UsageError (a ValueError) on invalid values, before any launch."""
    arguments.validate(self)
    aws = self.view_as(S3Options)
    for name, variable in _CREDENTIAL_OPTIONS.items():
      if getattr(aws, name, None):
        raise UsageError(
          f'--{name} would show a credential in the pipeline options: set '
          f'{variable} in the environment instead (or use a profile or an '
          'instance role)'
        )

  def store_config(self) -> StoreConfig:
    """How the stages reach object stores: Beam's standard S3 endpoint,
    region and TLS options, and this pipeline's concurrency and attempts."""
    aws = self.view_as(S3Options)
    verify = aws.s3_verify
    if aws.s3_disable_ssl:
      verify = False
    return StoreConfig(
      s3_endpoint_url=aws.s3_endpoint_url,
      s3_region=aws.s3_region_name,
      s3_verify=verify,
      read_concurrency=self.read_concurrency,
      attempts=self.request_attempts,
      redact_logs=self.pseudonymize_key_file is not None,
    )

  def dicomweb_config(self) -> DicomWebConfig | None:
    """The PACS the slices come from (--dicomweb-url), or None. It names the
    auth file, never a credential: workers read the secret where they use it."""
    if self.dicomweb_url is None:
      return None
    return DicomWebConfig(
      url=check_url(self.dicomweb_url),
      auth_file=self.dicomweb_auth_file,
      ca_bundle=self.dicomweb_ca_bundle,
      concurrency=self.read_concurrency,
      attempts=self.request_attempts,
      page_size=self.dicomweb_page_size,
      retrieve=self.dicomweb_retrieve or SERIES,
    )

  def pseudonyms(self) -> Pseudonyms:
    """The pseudonyms of --pseudonymize-key-file's key (IDENTITY without
    one), emitting id-map rows with --id-map. The key travels to the workers
    inside the stages that use it, never in the pipeline options."""
    path = self.pseudonymize_key_file
    if path is None:
      return IDENTITY
    key_pseudonyms = keys.load(path)
    return key_pseudonyms if self.id_map is None else key_pseudonyms.with_map()

  def resolve(self) -> Resolved:
    """Validates the options and resolves them into frozen settings.

    Raises:
      UsageError: an invalid value, an unusable key file or DICOMweb URL.
    """
    self.validate_ingest()
    text = self.series_filter
    decode = DecodeSettings(
      chunk_size=self.chunk_size,
      labeled_only=self.labeled_only,
      exclude_burned_in=self.exclude_burned_in,
      max_pixels=self.max_pixels,
      max_file_bytes=self.max_file_bytes,
      max_chunk_bytes=self.max_chunk_bytes,
      split_fractions=splits.parse_fractions(self.split),
      isolate=not self.decode_in_process,
      decode_timeout=self.decode_timeout,
      decoders=self.decoders,
      progress_seconds=self.progress_seconds,
      store=self.store_config(),
      dicomweb=self.dicomweb_config(),
      pseudonyms=self.pseudonyms(),
    )
    return Resolved(decode, None if text is None else parse_series_filter(text))


def beam_parser() -> argparse.ArgumentParser:
  """The parser Beam builds from every registered PipelineOptions class (its
  own, the runners', IngestOptions), as Beam itself parses a command line."""
  captured = []
  PipelineOptions([]).get_all_options(add_extra_args_fn=captured.append)
  parser = captured[0]
  parser.prog = 'run_pipeline.py'
  parser.exit_on_error = False
  return parser


def check_known(argv: Sequence[str]) -> None:
  """Raises UsageError for the first argument no options class knows, or a
  value an option does not accept, naming the closest valid option."""
  parser = beam_parser()
  try:
    _, unknown = parser.parse_known_args(list(argv))
  except argparse.ArgumentError as e:
    raise UsageError(str(e)) from e
  if not unknown:
    return
  first = unknown[0]
  if not first.startswith('-'):
    raise UsageError(f'unexpected argument {first!r}: options take the form --name')
  name = first.split('=', 1)[0]
  known = [flag for action in parser._actions for flag in action.option_strings]
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  hint = f'; did you mean {close[0]}?' if close else '; --help lists the options'
  raise UsageError(f'unknown option {name}{hint}')
