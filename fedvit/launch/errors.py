"""The runner's own error (no imports: every launch module may raise it)."""


class RunnerError(RuntimeError):
    """The machinery around a run broke (SuperLink did not start, ``flwr`` missing ...)."""
