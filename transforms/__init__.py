"""The pipeline's stages, one module each: listing, reconcile, decode, write.

They import only ``beam_pipeline.contract`` and their own parts (chunks,
dicom, assemble, masks, quality, the private helpers), never each other.
"""
