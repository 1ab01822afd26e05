"""TreeSource: link.csv and the slices and contours of the input tree."""

from __future__ import annotations

import apache_beam as beam

from transforms.contract.pseudonyms import IDENTITY, Pseudonyms
from transforms.io import stores
from transforms.sources.listing import ListTree, ReadLinks
from transforms.sources.source import TREE, Source


class TreeSource(Source):
  """link.csv, dicoms/ and contourfiles/ of the tree at ``input_root`` (a
  local folder or an object-store prefix), with the outputs of every Source."""

  wording = TREE

  def __init__(
    self,
    input_root: str,
    config: stores.StoreConfig | None = None,
    pseudonyms: Pseudonyms = IDENTITY,
  ):
    super().__init__()
    self._input_root = input_root
    self._config = config
    self._pseudonyms = pseudonyms

  def expand(self, pbegin):
    links = pbegin | 'ReadLinks' >> ReadLinks(
      self._input_root, self._config, self._pseudonyms
    )
    files = pbegin | 'ListTree' >> ListTree(
      self._input_root, self._config, pseudonyms=self._pseudonyms
    )
    return {
      self.LINKS: links[ReadLinks.LINKS],
      self.DICOMS: files[ListTree.DICOMS],
      self.CONTOURS: files[ListTree.CONTOURS],
      self.REPORTED: pbegin | 'NoneReported' >> beam.Create([]).with_output_types(str),
      self.RECONCILIATION: links[ReadLinks.RECONCILIATION],
      self.ERRORS: (links[ReadLinks.ERRORS], files[ListTree.ERRORS])
      | 'SourceErrors' >> beam.Flatten(),
      self.ID_MAP: (links[ReadLinks.ID_MAP], files[ListTree.ID_MAP])
      | 'SourceIdMap' >> beam.Flatten(),
    }
