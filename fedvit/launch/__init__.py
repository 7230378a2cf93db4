"""The machinery behind ``fedvit run`` (:func:`fedvit.runner.run_flwr`), one concern per module.

- :mod:`~fedvit.launch.runconfig`: Flower's ``key=value`` run-config text, read and written;
  local paths made absolute.
- :mod:`~fedvit.launch.prepare`: the app's ``pyproject.toml``, the run config checked (a fedvit
  one resolved and validated), the run directory, the ``--federation-config``.
- :mod:`~fedvit.launch.procs`: processes seen in ``/proc``, the tags every runner-started process
  carries, killing them, reaping what a dead launcher left.
- :mod:`~fedvit.launch.superlink`: the private SuperLink and its teardown.
- :mod:`~fedvit.launch.ray_head`: the private Ray head a local simulation joins, started beside
  the SuperLink.
- :mod:`~fedvit.launch.ray_cluster`: checks of a running Ray cluster a simulation joins.
- :mod:`~fedvit.launch.session`: submit, stream the log, poll the final status (``flwr`` CLI).
- :mod:`~fedvit.launch.watchdog`: the process that tears a run down when its launcher dies.
- :mod:`~fedvit.launch.errors`: :class:`~fedvit.launch.errors.RunnerError`.

Nothing is imported here, so that the watchdog starts without loading more than it needs.
"""
