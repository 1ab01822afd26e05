"""The pipeline's stages, PTransforms and DoFns (docs/ARCHITECTURE.md).

Six stages: ``sources`` (a tree, or a PACS with the tree's contours),
``reconcile``, ``decode``, ``duplicates`` and ``write``; below them the
modules they share (``settings``, ``tuning``, ``outcomes``), ``io`` (stores,
DICOMweb) and ``contract`` (what every part of the project agrees on). None of
them imports ``beam_pipeline``.
"""
