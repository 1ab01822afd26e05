"""Cardiac-MRI DICOM + contour trees to a training-ready Parquet dataset.

What a user runs, in layers (docs/ARCHITECTURE.md): ``launch`` (the command
line and one run, from options to summary) over ``pipeline`` (the graph) over
``tools`` (the other commands) over ``dataset`` (the reader training scripts
import). The stages and the contract they share live in ``transforms``.
"""

__version__ = '0.1.0'
