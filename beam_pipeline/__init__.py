"""Cardiac-MRI DICOM + contour trees to a training-ready Parquet dataset.

Modules: ``options`` (pipeline options), ``pipeline`` (graph and launch),
``schema`` (the output contract), ``dataset`` (reading the output back),
``layout`` (the input layout), ``sample`` (the data generator).
"""

__version__ = '0.1.0'
