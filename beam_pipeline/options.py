"""IngestOptions: the pipeline's own options, as a Beam PipelineOptions view.

The declarations live in ``beam_pipeline.arguments`` (Beam-free, so that
``--help`` needs no Beam); every standard Beam option passes through too.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from beam_pipeline import arguments
from beam_pipeline.contract import splits
from transforms.settings import DecodeSettings


class IngestOptions(PipelineOptions):
  """Options of the cardiac-MRI ingestion pipeline; read with ``view_as``."""

  @classmethod
  def _add_argparse_args(cls, parser):
    arguments.add_arguments(parser)

  def validate_ingest(self) -> None:
    """Raises UsageError (a ValueError) on invalid values, before any launch."""
    arguments.validate(self)

  def decode_settings(self) -> DecodeSettings:
    """The decode stage's settings from these options."""
    return DecodeSettings(
      chunk_size=self.chunk_size,
      labeled_only=self.labeled_only,
      max_pixels=self.max_pixels,
      split_fractions=splits.parse_fractions(self.split),
      isolate=not self.decode_in_process,
      decode_timeout=self.decode_timeout,
      decoders=self.decoders,
      progress_seconds=self.progress_seconds,
    )
