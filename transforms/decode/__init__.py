"""The decode stage: ``stage`` (the PTransform, its DoFns and the windowed
reader) over its parts: ``fetch`` (the one interface to where the bytes are:
a tree, an object store, a PACS), ``chunks`` (work items), ``dicom`` and ``_native``
(pydicom and the native header and pixel reader), ``_isolate`` (decoding in
a child process), ``series`` (a PACS series retrieved in one request),
``assemble`` (a slice's row), ``masks`` and ``quality``.
"""
