"""On a CUDA machine, clients train on the GPU: every method runs its rounds there with bf16
autocast, fp32 on the GPU computes what the CPU computes, and what a GPU client stores is plain
host data that a CPU machine reads. Skipped where CUDA is absent (CI); run on a GPU with
``pytest tests/test_cuda.py`` (clients' ``device`` is ``auto``: CUDA when present)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "behaviour_check.py"
_spec = importlib.util.spec_from_file_location("behaviour_check", SCRIPT)
behaviour_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(behaviour_check)  # type: ignore[union-attr]


def _numbers(result: dict) -> list[float]:
    """Every per-client loss and accuracy of a behaviour-check result."""
    return [
        v
        for r in result["rounds"]
        for key, per_client in r.items()
        if key != "round"
        for v in per_client.values()
        if v is not None
    ]


@pytest.mark.parametrize("method", behaviour_check.methods())
def test_every_method_trains_its_clients_on_the_gpu_with_bf16_autocast(method: str, tmp_path: Path) -> None:
    torch.cuda.reset_peak_memory_stats()
    result = behaviour_check.run_method(method, tmp_path, "clients.device=cuda train.amp=true")
    assert torch.cuda.max_memory_allocated() > 0, "nothing ran on the GPU"
    numbers = _numbers(result)
    assert numbers and all(math.isfinite(v) for v in numbers)
    assert len(result["rounds"]) == behaviour_check.ROUNDS


@pytest.mark.parametrize("method", ["fedavg", "fedper", "fedperfix", "fedtp"])
def test_fp32_on_the_gpu_computes_what_the_cpu_computes(method: str, tmp_path: Path) -> None:
    cpu = behaviour_check.run_method(method, tmp_path / "cpu", "clients.device=cpu")
    gpu = behaviour_check.run_method(method, tmp_path / "gpu", "clients.device=cuda train.amp=false")
    a, b = np.array(_numbers(cpu)), np.array(_numbers(gpu))
    assert a.shape == b.shape
    # Same data order, same initial weights; only the kernels differ (TF32 convolutions, reduction order).
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05)


def test_a_gpu_clients_stored_state_is_host_data_a_cpu_machine_reads(tmp_path: Path) -> None:
    behaviour_check.run_method("fedper", tmp_path, "clients.device=cuda")
    stored = sorted(tmp_path.glob("**/private.npz"))
    assert stored, "no private state was stored"
    for path in stored:
        with np.load(path, allow_pickle=False) as z:
            assert z.files and all(np.isfinite(z[k]).all() for k in z.files)
    ckpt = next(tmp_path.glob("**/checkpoint/arrays.npz"))
    with np.load(ckpt, allow_pickle=False) as z:
        assert z.files
    results = json.loads(next(tmp_path.glob("**/results.json")).read_text())
    assert results["status"] == "completed"
