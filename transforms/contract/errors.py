"""The project's few domain exceptions.

Each one marks an input that cannot be used; the pipeline turns it into a row
of the dead-letter table (``OUT/errors/``) instead of failing the run.
"""


class InputError(ValueError):
  """An input file cannot be used. The message says why, for the errors table."""


class ContourError(InputError):
  """A contour file does not hold a usable polygon."""


class DicomError(InputError):
  """A DICOM file cannot be decoded into one image."""


class FileTooLargeError(InputError):
  """A file is larger than --max-file-bytes (or inflates beyond it)."""


class UnsafePathError(InputError):
  """A path resolves outside the input root (for example through a symlink)."""


def causes(e: BaseException) -> list[BaseException]:
  """``e`` and what it was raised from or during, outermost first (runners
  wrap what a DoFn raised); a cycle in the chain ends it."""
  chain: list[BaseException] = []
  while e is not None and all(e is not seen for seen in chain):
    chain.append(e)
    e = e.__cause__ or e.__context__
  return chain


class UsageError(ValueError):
  """Invalid options or input tree, found before anything launches."""
