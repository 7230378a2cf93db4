"""Warm Ray's worker processes before the first message: the ClientApp's imports at worker start.

Flower's Ray backend creates its actors when the simulation starts, but a worker imports the
ClientApp (torch, timm, flwr, fedvit: seconds of CPU) only when its first message arrives, i.e.
during discovery, after the ServerApp has set itself up. Ray runs a *worker process setup hook* in
every worker it starts; :func:`ray_runtime_env`, named in ``RAY_RUNTIME_ENV_HOOK`` (read by
``ray.init`` in the simulation process; :mod:`fedvit.runner` sets it for local simulations), adds
:func:`warm_up` as that hook, so the imports overlap with the ServerApp's own set-up.

This module stays import-light: ``ray.init`` loads it in the simulation's driver.
"""

from __future__ import annotations

import logging
from typing import Any

#: ``RAY_RUNTIME_ENV_HOOK`` value that installs :func:`warm_up` (see the module doc).
RUNTIME_ENV_HOOK = "fedvit.warmup.ray_runtime_env"
SETUP_HOOK = "fedvit.warmup.warm_up"


def ray_runtime_env(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Ray's runtime-env hook: ``runtime_env`` plus :func:`warm_up` as the worker setup hook
    (a setup hook already given wins)."""
    env = dict(runtime_env or {})
    env.setdefault("worker_process_setup_hook", SETUP_HOOK)
    return env


def warm_up() -> None:
    """Import the ClientApp now. A failure is only logged: the first message then meets it again
    and reports it the way Flower reports a ClientApp error."""
    try:
        import fedvit.client_app  # noqa: F401
    except Exception as err:  # reported again by the first message
        logging.getLogger("fedvit").warning("warm-up import of fedvit.client_app failed: %s", err)
