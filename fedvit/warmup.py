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


#: What every client worker's first message needs: the ClientApp (torch, flwr, fedvit), the model
#: builders (timm, which imports torchvision and with it ``torch._dynamo``: the largest single
#: import, seconds of CPU; the ClientApp imports them only when it builds its first model) and the
#: data modules it reads a client's datasets with (``fedvit.data`` imports its submodules on
#: first use). A method's own client module is not among them: the first message imports the one
#: its run names (:func:`fedvit.registry.get_client`), so a worker holds no other method's code.
WARM_MODULES = (
    "fedvit.client_app",
    "fedvit.models",
    "fedvit.data.datasets",
    "fedvit.data.partition",
    "fedvit.data.sources",
)


def warm_up() -> None:
    """Import :data:`WARM_MODULES` and read the registry's index of client names now. A failure
    is only logged: the first message then meets it again and reports it the way Flower reports
    a ClientApp error."""
    import importlib

    try:
        for name in WARM_MODULES:
            importlib.import_module(name)
        from fedvit.registry import declared

        declared("client")
    except Exception as err:  # reported again by the first message
        logging.getLogger("fedvit").warning("warm-up import of the ClientApp failed: %s", err)
