"""Runs one publish (the commit of a staged run) and kills itself part-way.

``python -m tests.publish_killer CAPTURED.json N`` publishes the staged run
described in CAPTURED.json (tests/test_versions.py captures it) and sends
itself SIGKILL at the N-th step it takes: every file it opens for writing,
renames or deletes, every HTTP request it sends from Python, and each of
publish's own steps (its audit events, ``publish.AUDIT_EVENT``). N = -1 runs
to the end and prints the number of steps; ``--after S`` kills after S
seconds instead (inside deltalake's commits, which Python does not see).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

from beam_pipeline.launch import publish
from transforms.io import stores
from transforms.io.protocol import StoreConfig

_EVENTS = {
  'os.rename',
  'os.remove',
  'os.rmdir',
  'os.mkdir',
  'shutil.rmtree',
  'shutil.copyfile',
  'http.client.send',
  publish.AUDIT_EVENT,
}


def main(argv: list[str]) -> int:
  captured, at = argv[0], float(argv[1])
  after = '--after' in argv
  with open(captured) as f:
    args = json.load(f)
  stores.configure(StoreConfig(**args.pop('config')))
  seen = 0

  def hook(event, details):
    nonlocal seen
    if event == 'open':
      _, mode, flags = details
      if isinstance(mode, str):
        writes = any(c in mode for c in 'wax+')
      else:  # os.open: the flags say
        writes = bool((flags or 0) & (os.O_WRONLY | os.O_RDWR))
      if not writes:
        return
    elif event not in _EVENTS:
      return
    seen += 1
    if not after and seen == at:
      os.kill(os.getpid(), signal.SIGKILL)

  if after:
    threading.Timer(at, os.kill, (os.getpid(), signal.SIGKILL)).start()
  sys.addaudithook(hook)
  version = publish.publish(**args)
  print(json.dumps({'steps': seen, 'version': version}))
  os._exit(0)  # the timer thread, if any, must not keep it alive


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
