"""Dataflow translation: the whole job graph builds offline with --dry_run."""

import pytest

from beam_pipeline.launch import cli, run

pytest.importorskip('apache_beam.runners.dataflow.internal.apiclient')

ARGS = [
  '--runner=DataflowRunner',
  '--dry_run=True',
  '--project=dummy-project',
  '--region=us-central1',
  '--temp_location=gs://dummy-bucket/tmp',
  '--input=gs://dummy-bucket/DATA',
  '--output=gs://dummy-bucket/OUT',
]


def test_dataflow_dry_run_translates_every_stage(capsys):
  job = run.run(ARGS).result.job
  names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
  for stage in (
    'Source/ReadLinks',
    'Source/ListTree',
    'Reconcile/JoinByOriginalId',
    'Reconcile/JoinByPatient',
    'Decode/PlanChunks',
    'Decode/FanOut',
    'Decode/DecodeSlices',
    'Write/WriteSlices',
    'Write/ByReport',
    'Write/WriteReports',
  ):
    assert stage in names, stage
  assert job.proto.name.startswith('beamapp-')
  assert 'nothing was submitted' in capsys.readouterr().out


def test_dry_run_exits_zero_without_touching_the_paths():
  assert cli.main(ARGS) == cli.EXIT_OK


def test_a_pacs_job_translates_and_its_options_hold_no_secret(monkeypatch):
  monkeypatch.setenv('DICOMWEB_TOKEN', 'token-never-in-the-graph')
  args = [
    *ARGS,
    '--dicomweb-url=https://pacs.example/dicom-web',
    '--series-filter=SeriesDescription=*cine*',
  ]
  job = run.run(args).result.job
  names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
  assert 'Source/SearchPacs/Search' in names and 'Decode/DecodeSlices' in names
  assert b'token-never-in-the-graph' not in job.proto_pipeline.SerializeToString()
  assert 'token-never-in-the-graph' not in str(job.proto)
