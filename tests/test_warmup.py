"""A Ray worker's warm-up imports what every first message needs, and no method's code."""

from __future__ import annotations

import json
import subprocess
import sys

from fedvit import warmup


def test_warm_up_imports_the_client_app_and_data_layer_but_no_method_module() -> None:
    code = (
        "import json, sys\n"
        "from fedvit import warmup\n"
        "before = sorted(m for m in warmup.WARM_MODULES if m in sys.modules)\n"
        "warmup.warm_up()\n"
        "from fedvit.registry import declared\n"
        "print(json.dumps({'before': before,\n"
        "    'after': sorted(m for m in warmup.WARM_MODULES if m in sys.modules),\n"
        "    'torch': 'torch' in sys.modules, 'index_read': declared.cache_info().currsize,\n"
        "    'methods': sorted(m for m in sys.modules if m.startswith(('strategies.', 'clients.')))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["before"] == [] and seen["after"] == sorted(warmup.WARM_MODULES)
    assert seen["torch"] and seen["index_read"] == 1
    assert seen["methods"] == []  # the first message imports its own method's client only


def test_a_failed_warm_up_is_logged_not_raised(monkeypatch, caplog) -> None:
    monkeypatch.setattr(warmup, "WARM_MODULES", ("fedvit.no_such_module",))
    warmup.warm_up()
    assert "warm-up import of the ClientApp failed" in caplog.text


def test_the_server_and_client_app_modules_load_without_the_model_builders() -> None:
    # flwr-simulation loads the ClientApp in the ServerApp's process before it starts Ray's
    # workers, and that load waits for the ServerApp module's imports: neither may pull in timm
    # (seconds of imports) at load time; the ServerApp imports it when it runs.
    code = (
        "import json, sys\n"
        "import fedvit.server_app, fedvit.client_app\n"
        "print(json.dumps({'timm': 'timm' in sys.modules, 'torch': 'torch' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"timm": False, "torch": True}  # torch at the ClientApp's top
