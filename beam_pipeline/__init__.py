"""Cardiac-MRI DICOM + contour trees to a training-ready Parquet dataset.

Layers, top down (README "Architecture"): ``cli`` (the command line);
the application (``pipeline``: graph and launch, ``options``, ``arguments``,
``publish``, ``summary``, ``console``); the user tools (``dataset``: reading
the output back, ``torch_data``, ``render``, ``inspect``, ``qa``, ``verify``,
``sample``: the data generator); the stages live in the ``transforms``
package; ``contract`` (schema, column table, input layout, splits, metric
names, errors) is at the bottom.
"""

__version__ = '0.1.0'
