"""The pure-compute bound of a round (step 2 of :mod:`fedvit.bench_round`): seconds per image of
a train step and an eval forward of the config's model on one thread (alone, or with every core
busy), the images each client trains and evaluates in a round, and the bound they give."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedvit.config import ConfigError, FedvitConfig


def images_per_client_round(n_train: int, cfg: FedvitConfig) -> int:
    """Training images one client processes in a round (``local_steps`` or ``local_epochs``)."""
    tc = cfg.train
    if tc.local_steps is None:
        return tc.local_epochs * n_train
    per_epoch = math.ceil(n_train / tc.batch_size)  # batches of one pass; the last may be short
    full, rest = divmod(tc.local_steps, per_epoch)
    return full * n_train + rest * tc.batch_size


def bound_seconds(n_train: float, n_eval: float, t_train: float, t_eval: float, cores: int) -> float:
    """Perfectly packed compute of a round: ``(n_train t_train + n_eval t_eval) / cores``."""
    if cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    return (n_train * t_train + n_eval * t_eval) / cores


def step_costs(
    cfg: FedvitConfig, seconds: float = 8.0, batch: int | None = None, repeats: int = 1
) -> dict[str, Any]:
    """Seconds per image of a train step and of an eval forward of ``cfg``'s model, 1 thread.

    The loop of ``tools/round_bound.py``: 3 warm-up steps, then steps until ``seconds`` passed;
    random inputs, ``batch`` (default ``train.batch_size``) images per step. The train step is
    cross-entropy, backward, the gradient clipping of ``train.grad_clip`` and a step of the
    optimizer :func:`fedvit.training.make_optimizer` builds from ``cfg.train``. With ``repeats`` >
    1 the two measurements alternate that many times and each kind keeps its fastest, the least
    disturbed (a bound: noise only adds time); every measurement is in ``*_samples``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    import torch

    from fedvit.models import build_model, example_input
    from fedvit.training import make_optimizer

    if cfg.model.arch != "vit":
        raise ConfigError(
            f"bench round: the compute bound needs an image model, model.arch is {cfg.model.arch}"
        )
    bs = batch or cfg.train.batch_size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = build_model(cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg.train)
        x = torch.randn_like(example_input(cfg, bs))
        y = torch.randint(0, cfg.data.num_classes, (bs,))
        clip = cfg.train.grad_clip

        def train_step() -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()

        def eval_step() -> None:
            with torch.inference_mode():
                model(x).argmax(1)

        def per_image(fn: Callable[[], None]) -> float:
            for _ in range(3):
                fn()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                n += 1
            return (time.perf_counter() - t0) / (n * bs)

        trains, evals = [], []
        for _ in range(repeats):
            model.train()
            trains.append(per_image(train_step))
            model.eval()
            evals.append(per_image(eval_step))
    finally:
        torch.set_num_threads(threads)
    return {
        "train_s_per_image": min(trains),
        "eval_s_per_image": min(evals),
        "train_s_per_image_samples": trains,
        "eval_s_per_image_samples": evals,
        "batch_size": bs,
        "torch_threads": 1,
        "seconds_per_measure": seconds,
        "repeats": repeats,
        "model_params": sum(p.numel() for p in model.parameters()),
    }


def concurrent_step_costs(cfg: FedvitConfig, procs: int, seconds: float = 8.0) -> dict[str, Any]:
    """:func:`step_costs` in ``procs`` processes at once (1 thread each), as the round runs its
    workers: what the same steps cost when every core is busy (shared caches, memory bandwidth,
    the host's scheduling of this VM's cores). Per-image seconds, the mean over the processes."""
    import pickle

    with tempfile.TemporaryDirectory(prefix="fedvit-costs-") as tmp:
        cfg_path = Path(tmp) / "cfg.pkl"
        cfg_path.write_bytes(pickle.dumps(cfg))
        cmd = [sys.executable, "-m", "fedvit.bench_round", "--costs", str(cfg_path), str(seconds)]
        children = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(procs)
        ]
        outs = [c.communicate(timeout=20 * seconds + 120) for c in children]
    for child, (_out, err) in zip(children, outs, strict=True):
        if child.returncode != 0:
            raise RuntimeError(f"bench round: concurrent step costs failed: {err.strip()[-500:]}")
    costs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    return {
        "processes": procs,
        "train_s_per_image": statistics.fmean(c["train_s_per_image"] for c in costs),
        "eval_s_per_image": statistics.fmean(c["eval_s_per_image"] for c in costs),
    }


def client_sizes(cfg: FedvitConfig) -> list[dict[str, int]]:
    """Per client: training images of a round (``train``) and evaluated images (``eval``: val + test)."""
    from fedvit.data import build_partition

    part = build_partition(cfg)
    return [
        {
            "train": images_per_client_round(len(part.train[k]), cfg),
            "eval": len(part.val[k]) + len(part.test[k]),
        }
        for k in range(part.num_clients)
    ]
