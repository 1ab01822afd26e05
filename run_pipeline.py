"""Runs the cardiac-MRI ingestion pipeline. See README.md; --help lists options."""

import sys

from beam_pipeline.launch.cli import entry

if __name__ == '__main__':
  sys.exit(entry())
