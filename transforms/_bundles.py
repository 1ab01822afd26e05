"""What a DoFn emits from ``finish_bundle``.

Stages that keep work ahead within a bundle (the decode stage's next chunk,
the PACS searches in flight) emit the rest when the bundle ends, where no
input element gives the outputs a window.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from apache_beam import pvalue
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue


def in_global_window(value) -> WindowedValue:
  """An output of finish_bundle, which has no input element to take its
  window from: the pipeline's only window."""
  return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


def finished(outputs: Iterable) -> Iterator:
  """``outputs`` (main values and TaggedOutputs) as finish_bundle must emit
  them: each in the global window."""
  for output in outputs:
    if isinstance(output, pvalue.TaggedOutput):
      yield pvalue.TaggedOutput(output.tag, in_global_window(output.value))
    else:
      yield in_global_window(output)
