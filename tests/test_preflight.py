"""The checks before launch: the survey of a tree, the output checks, and the
DirectRunner mode chosen from the slice count and the cores."""

import os

import pytest

from beam_pipeline.launch import cli, preflight
from beam_pipeline.tools import sample
from transforms import settings
from transforms.contract.errors import UsageError


def test_the_survey_counts_slices_and_labelled_slices_and_sizes_a_row(tmp_path):
  manifest = sample.make_tree(
    str(tmp_path / 'DATA'),
    patients=3,
    slices=7,
    rows=20,
    columns=30,
    quirks=['stray_files'],
  )
  found = preflight.survey(str(tmp_path / 'DATA'))
  assert found.complete
  assert found.slices == len(manifest.slices)
  assert found.labeled == sum(1 for s in manifest.slices.values() if s.labeled)
  image = 20 * 30 * 2  # int16
  assert image < found.bytes_per_slice < image + 2 * 20 * 30 // 8 + 1024
  assert found.dataset_bytes(True) == found.labeled * found.bytes_per_slice


def test_the_estimate_follows_the_image_codec(tmp_path):
  """A compressing codec shrinks the estimate by what it makes of the sampled
  files; with the default codec the estimate is within 25 % of the dataset a
  run writes."""
  root, out = str(tmp_path / 'DATA'), str(tmp_path / 'OUT')
  sample.make_tree(root, patients=2, slices=40, rows=128, columns=128)
  raw = preflight.survey(root)
  found = preflight.survey(root, settings.DEFAULT_IMAGE_CODEC)
  assert found.bytes_per_slice < 0.8 * raw.bytes_per_slice
  assert cli.main(['--input', root, '--output', out]) == cli.EXIT_OK
  written = sum(
    os.path.getsize(os.path.join(folder, name))
    for folder, _, names in os.walk(os.path.join(out, 'slices'))
    for name in names
  )
  assert 0.75 < found.dataset_bytes(False) / written < 1.25


def test_the_survey_of_an_object_store_tree_is_not_made():
  assert preflight.survey('s3://bucket/DATA') is None


def test_a_warning_when_the_dataset_takes_most_of_the_free_space(tmp_path, caplog):
  free = preflight.shutil.disk_usage(tmp_path).free
  preflight.check_output(str(tmp_path / 'OUT'), int(free * 0.9))
  assert 'the dataset needs about' in caplog.text
  with pytest.raises(UsageError, match='--skip-space-check'):
    preflight.check_output(str(tmp_path / 'NEW' / 'OUT'), free * 2)
  assert not (tmp_path / 'NEW').exists()  # the folders it made are removed
  preflight.check_output(str(tmp_path / 'OUT2'), free * 2, space_check=False)
  assert os.listdir(tmp_path / 'OUT2') == []  # the probe is gone


@pytest.mark.parametrize('cores', [2, 4, 8, 64])
def test_processes_are_chosen_above_the_crossover_only(cores):
  limit = preflight.crossover(min(cores, preflight.MAX_WORKERS))
  below = preflight.Survey(int(limit) - 1, 0, 1, True)
  above = preflight.Survey(int(limit) + 1, 0, 1, True)
  assert preflight.choose_direct_mode(below, cores).running_mode == 'in_memory'
  chosen = preflight.choose_direct_mode(above, cores)
  assert chosen.running_mode == 'multi_processing'
  assert chosen.workers == min(cores, preflight.MAX_WORKERS)


def test_the_crossover_follows_the_measured_rates():
  """At the crossover the two modes' modelled times are equal; more cores
  lower it; one core never uses worker processes."""
  for workers in (2, 4, 8):
    n = preflight.crossover(workers)
    in_process = n / preflight.IN_PROCESS_RATE
    processes = preflight.WORKER_START_SECONDS + n / (preflight.WORKER_RATE * workers)
    assert in_process == pytest.approx(processes)
  assert preflight.crossover(2) > preflight.crossover(4) > preflight.crossover(8)
  assert preflight.crossover(1) == float('inf')
  one_core = preflight.choose_direct_mode(preflight.Survey(10**9, 0, 1, True), 1)
  assert one_core.running_mode == 'in_memory'
