"""Remove old versions' files: ``cardiac-mri vacuum OUT --retain-hours H``.

Every version stays readable until its files are removed here. Each table
(slices and both reports) keeps the files of its latest version and of every
version replaced less than ``--retain-hours`` ago; older ones go, and so do
files no version names (left by an interrupted run). With ``--retain-hours
0`` the folder holds exactly the latest version, which is then also what a
plain Parquet reader sees. The log is kept: ``history`` still lists every
version, and marks those whose files are gone. The staging folders that
runs no longer running left (``OUT/_incomplete-<run id>/``; a run that filled
the disk leaves its own) go too, as the next run would remove them. Holds
the output's lock, like a run, so it never removes a file a run is
committing, nor a live run's staging folder.
"""

from __future__ import annotations

import argparse
import sys

from beam_pipeline.dataset import versions
from beam_pipeline.launch import lock, publish
from beam_pipeline.tools import pipe
from transforms.contract.errors import UsageError
from transforms.io import stores

DEFAULT_RETAIN_HOURS = 168  # Delta Lake's own default: 7 days


def vacuum(output: str, retain_hours: float, dry_run: bool = False) -> list[str]:
  """Removes (or with ``dry_run`` lists) the files of versions replaced more
  than ``retain_hours`` ago, files no version names and the staging folders
  of runs no longer running; returns their paths (a folder's ending in
  ``/``).

  Raises:
    UsageError: ``output`` holds no dataset and no staging folder, or a run
      holds its lock.
  """
  from deltalake import DeltaTable
  from deltalake.transaction import PostCommitHookProperties

  versioned = publish.is_table(output)
  if not versioned and not publish.staging_folders(output):
    raise UsageError(f'{output} holds no versioned dataset (no slices/_delta_log)')
  removed = []
  with lock.hold(output, lock.new_run_id()):
    for staging in publish.staging_folders(output):  # holding the lock: dead runs'
      if not dry_run:
        publish.delete_tree(staging)
      removed.append(staging.rstrip('/') + '/')
    for table in publish.DATA_ENTRIES if versioned else ():
      uri = stores.join(output, table)
      if not publish.exists(stores.join(uri, versions.LOG_DIR)):
        continue
      found = DeltaTable(uri, storage_options=stores.table_options(uri)).vacuum(
        retention_hours=int(retain_hours),
        dry_run=dry_run,
        enforce_retention_duration=False,
        full=True,
        post_commithook_properties=PostCommitHookProperties(
          create_checkpoint=False, cleanup_expired_logs=False
        ),
      )
      removed += [stores.join(uri, path) for path in found]
  return sorted(removed)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('output', help='a pipeline output folder')
  parser.add_argument(
    '--retain-hours',
    type=float,
    default=DEFAULT_RETAIN_HOURS,
    help='keep the files of versions replaced less than this long ago '
    f'(default {DEFAULT_RETAIN_HOURS}, 7 days; 0 keeps only the latest version)',
  )
  parser.add_argument(
    '--dry-run', action='store_true', help='list what would go, remove nothing'
  )
  args = parser.parse_args(argv)
  if args.retain_hours < 0:
    parser.error('--retain-hours must be 0 or more')
  output = publish.absolute(args.output).rstrip('/')
  if output.startswith('gs://'):  # its commits go through a copy of the log
    print(
      f'error: {output}: vacuum works on a local or s3:// output; on gs:// '
      'remove old versions with a Delta tool that reaches GCS',
      file=sys.stderr,
    )
    return 2
  try:
    removed = vacuum(output, args.retain_hours, args.dry_run)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  verb = 'would remove' if args.dry_run else 'removed'
  for path in removed:
    pipe.out(f'{verb} {path}')
  folders = sum(path.endswith('/') for path in removed)
  staged = f' and {folders} staging folder(s) of runs no longer running'
  pipe.out(
    f'{verb} {len(removed) - folders} file(s){staged if folders else ""} from {output}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(pipe.run(main))
