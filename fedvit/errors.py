"""Errors every layer raises, in a module that imports nothing, so that low modules (data stores,
the method registry) can raise them without importing :mod:`fedvit.config` (which imports them).

:class:`ConfigError` is re-exported by :mod:`fedvit.config`, where users look for it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, with the offending key in the message."""
