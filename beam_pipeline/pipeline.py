"""The job's graph: ``build_pipeline`` adds it to a Beam pipeline.

One chain: a source (the tree, or a PACS with the tree's contours), the
reconciliation, the patients kept from the version the run starts from set
aside, the decode stage, duplicate detection and the writer. What it
needs comes in one frozen ``Job``, resolved once by the launcher
(``beam_pipeline.launch``), which also runs the job and publishes its output.
"""

from __future__ import annotations

import dataclasses
import os

import apache_beam as beam
from apache_beam import coders
from apache_beam.io import filebasedsink
from apache_beam.io.filesystem import CompressionTypes

from beam_pipeline.tools import keys
from transforms.assign import AssignSplits
from transforms.contract import local_files, schema
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
  (beside --id-map, outside the output, made 0700 by the launcher;
  ``keys.stage_id_map`` joins them once the job is done), every part 0600
  from its first byte (``_PrivateLines``)."""

  def __init__(self, folder: str):
    super().__init__()
    self._folder = folder

  def expand(self, entries):
    return (
      entries
      | 'AllEntries' >> beam.Flatten()
      | 'AsLines' >> beam.Map(keys.entry_line).with_output_types(str)
      | 'Once' >> beam.Distinct()
      | 'WriteParts' >> beam.io.Write(_PrivateLines(f'{self._folder}/part'))
    )


class _PrivateLines(filebasedsink.FileBasedSink):
  """Lines of text to ``{prefix}-SSSSS-of-NNNNN.csv``, as WriteToText writes
  them, but the sink's temporary folder made 0700 and each file created
  0600 (``O_CREAT | O_EXCL | O_NOFOLLOW``) whatever the umask: Beam's own
  local files are made with the umask's mode, world-readable by default,
  and the id map's rows re-identify the dataset."""

  def __init__(self, prefix: str):
    super().__init__(
      prefix,
      coder=coders.StrUtf8Coder(),
      file_name_suffix='.csv',
      mime_type='text/csv',
      compression_type=CompressionTypes.UNCOMPRESSED,
    )

  def initialize_write(self):
    folder = self._create_temp_dir(self.file_path_prefix.get())
    os.mkdir(folder, 0o700)
    return folder

  def open(self, temp_path):
    return local_files.create_new(temp_path, 0o600)

  def write_encoded_record(self, file_handle, encoded_value):
    file_handle.write(encoded_value + b'\n')
