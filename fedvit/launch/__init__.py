"""The machinery behind ``fedvit run`` (:mod:`fedvit.runner`), one concern per module.

- :mod:`~fedvit.launch.errors`: :class:`RunnerError`.
- :mod:`~fedvit.launch.procs`: processes seen in ``/proc``, the tags every runner-started
  process carries, killing them, reaping what a dead launcher left.
- :mod:`~fedvit.launch.watchdog`: the process that tears a run down when its launcher dies.

Nothing is imported here, so that the watchdog starts without loading more than it needs.
"""
