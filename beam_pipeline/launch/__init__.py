"""Everything that runs a job around the graph.

``cli`` (the ``cardiac-mri`` command and its exit codes) over ``run`` (one
run from options to summary) over the launch steps: ``options`` and
``arguments`` (the command line, resolved once), ``preflight`` (checks before
anything launches), ``lock``, ``progress``, ``interrupts``, ``duplicate_plan``
(the duplicate flags applied to the staged shards), ``publish``, ``summary``
and ``console`` (what reaches the terminal and the log file).
"""
