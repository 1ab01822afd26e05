"""The pipeline's stages, one module each: reconcile, decode (with masks), write."""
