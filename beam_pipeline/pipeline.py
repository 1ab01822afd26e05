"""The job's graph: ``build_pipeline`` adds it to a Beam pipeline.

One chain: a source (the tree, or a PACS with the tree's contours), the
reconciliation, the patients kept from the version the run starts from set
aside, the decode stage, duplicate detection and the writer. What it
needs comes in one frozen ``Job``, resolved once by the launcher
(``beam_pipeline.launch``), which also runs the job and publishes its output.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from beam_pipeline.tools import keys
from transforms.assign import AssignSplits
from transforms.contract import schema
from transforms.decode.stage import DecodeSlices
from transforms.duplicates import FindDuplicates
from transforms.incremental import INPUTS_FILE, KeptIdentities, SplitKept
from transforms.io import stores
from transforms.io.dicomweb import SeriesFilter
from transforms.reconcile import Reconcile
from transforms.settings import DEFAULT_IMAGE_CODEC, DecodeSettings
from transforms.sources.pacs import PacsSource
from transforms.sources.source import Source
from transforms.sources.tree import TreeSource
from transforms.write import WriteDataset


@dataclasses.dataclass(frozen=True)
class Job:
  """Everything the graph needs, resolved once, before the job is built.

  Attributes:
    input: the input tree's root, absolute.
    staging: the folder the job writes into (the output's staging folder
      for this run; the launcher publishes it).
    decode: the decode stage's settings; they also hold the store, DICOMweb
      and pseudonym settings the other stages share.
    series_filter: which series of a PACS patient are slices (None: all).
    drop_duplicates: drop duplicate slices rather than flag them.
    image_codec: the image column's codec.
    id_map_parts: the folder for the id map's parts (None: no id map).
    previous: the fingerprints of the version the run starts from
      (incremental.PREVIOUS_FILE; None: every patient is decoded).
    pinned: the splits its patients keep (assign.PINNED_FILE; None: none).
    old_files: that version's slice files (read for the kept patients'
      identities).
  """

  input: str
  staging: str
  decode: DecodeSettings = DecodeSettings()
  series_filter: SeriesFilter | None = None
  drop_duplicates: bool = False
  image_codec: str = DEFAULT_IMAGE_CODEC
  id_map_parts: str | None = None
  previous: str | None = None
  pinned: str | None = None
  old_files: tuple[str, ...] = ()

  def source(self) -> Source:
    """The source the slices come from: the PACS, if one is set, else the tree."""
    config, pseudonyms = self.decode.store, self.decode.pseudonyms
    if self.decode.dicomweb is None:
      return TreeSource(self.input, config, pseudonyms)
    return PacsSource(
      self.input, self.decode.dicomweb, self.series_filter, config, pseudonyms
    )


def build_pipeline(p: beam.Pipeline, job: Job) -> None:
  """Adds the whole job to ``p``: read, reconcile, decode, write."""
  source = job.source()
  found = p | 'Source' >> source
  reconciled = found | 'Reconcile' >> Reconcile(source.wording)
  fractions, config = job.decode.split_fractions, job.decode.store
  assigned = reconciled[Reconcile.PATIENTS] | 'AssignSplits' >> AssignSplits(
    fractions, job.pinned, config, job.decode.labeled_only
  )
  patients = assigned | 'SplitKept' >> SplitKept(
    job.previous,
    stores.join(job.staging, INPUTS_FILE),
    fractions,
    config,
    job.decode.labeled_only,
  )
  decoded = patients[SplitKept.DECODE] | 'Decode' >> DecodeSlices(job.input, job.decode)
  identities = decoded[DecodeSlices.IDENTITIES]
  if job.previous is not None:
    kept = patients[SplitKept.KEPT] | 'KeptIdentities' >> KeptIdentities(
      job.old_files, job.input, fractions, config, job.decode.max_file_bytes
    )
    identities = (identities, kept) | 'AllIdentities' >> beam.Flatten()
  copies = identities | 'FindDuplicates' >> FindDuplicates(
    stores.join(job.staging, schema.DUPLICATES_PLAN_FILE),
    job.drop_duplicates,
    job.decode.store,
  )
  reconciliation = (
    found[Source.RECONCILIATION],
    reconciled[Reconcile.RECONCILIATION],
    copies,
  ) | 'AllReconciliation' >> beam.Flatten()
  errors = (
    found[Source.ERRORS],
    decoded[DecodeSlices.ERRORS],
  ) | 'AllErrors' >> beam.Flatten()
  _ = {
    WriteDataset.SLICES: decoded[DecodeSlices.SLICES],
    WriteDataset.RECONCILIATION: reconciliation,
    WriteDataset.ERRORS: errors,
  } | 'Write' >> WriteDataset(
    job.staging, job.image_codec, job.decode.store, job.decode.max_chunk_bytes
  )
  if job.id_map_parts is not None:
    _ = (
      found[Source.ID_MAP],
      decoded[DecodeSlices.ID_MAP],
    ) | 'IdMap' >> _WriteIdMap(job.id_map_parts)


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
