"""Input and output under the stages: object stores and local files
(``stores``), safe reads of input files (``files``), unbuffered local writes
(``direct``), DICOMweb (``dicomweb``) and its multipart answers
(``multipart``). Nothing here knows the stages or the data's layout beyond
paths and bytes.
"""
