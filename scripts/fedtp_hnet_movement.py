"""What did FedTP's hypernetwork learn? Compare a FedTP run's checkpointed hypernetwork with its
seeded initialization, and the attention weights it generates with those FedAvg trained.

    .venv/bin/python scripts/fedtp_hnet_movement.py FEDTP_RUN_DIR [FEDAVG_RUN_DIR]

For every hypernetwork parameter group (client embeddings, MLP, heads' weights, heads' biases =
the generated tensors' common part) it fits ``final ≈ s · init`` and prints ``s`` (weight decay
alone gives one ``s`` for everything) and the residual ``|final − s·init| / |final|`` (what the
gradient steps added). With a FedAvg run of the same config it also prints how far FedAvg moved
the same Q/K/V tensors from the same initialization. Both runs' configs come from their
``config.yaml``; the checkpoint is ``<run>/checkpoint/strategy.npz`` (``hnet.*``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hnet_fit import print_group_fits  # scripts/: shared with pfedla_hnet_movement.py


def main(argv: list[str]) -> int:
    from fedvit.export import config_from_yaml
    from fedvit.hypernet import WeightHypernet
    from fedvit.models import build_model
    from fedvit.params import parameter_groups
    from fedvit.registry import method_options

    fedtp_dir = Path(argv[0])
    cfg = config_from_yaml(fedtp_dir / "config.yaml")
    _, o = method_options(cfg)  # FedTP's typed Options: its defaults, not copies of them
    model = build_model(cfg)
    init_model = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    groups = parameter_groups(model)
    generated = [k for g in o.generated for k in groups[g]]
    hnet = WeightHypernet(
        cfg.clients.num_clients, {k: init_model[k] for k in generated}, o.hypernet(), seed=cfg.seed
    )
    init = {k: v.detach().numpy() for k, v in hnet.state_dict().items()}
    with np.load(fedtp_dir / "checkpoint" / "strategy.npz") as z:
        final = {k[len("hnet.") :]: z[k] for k in z.files if k.startswith("hnet.")}
    print(f"{fedtp_dir}: hypernetwork at the checkpoint vs its seeded initialization (final ≈ s·init + r)")
    rows = {
        "client embeddings": ["embeddings.weight"],
        "MLP": [k for k in init if k.startswith("mlp.")],
        "heads' weights": [k for k in init if k.startswith("heads.") and k.endswith("linear.weight")],
        "heads' biases (common part)": [
            k for k in init if k.startswith("heads.") and k.endswith("linear.bias")
        ],
    }
    print_group_fits(rows, init, final)
    if len(argv) > 1:
        with np.load(Path(argv[1]) / "checkpoint" / "arrays.npz") as z:
            fedavg = {k: z[k] for k in z.files}
        print(f"{argv[1]}: FedAvg's Q/K/V moved from the same initialization (|final − init| / |init|)")
        for k in generated:
            if k.endswith("weight"):
                moved = np.linalg.norm(fedavg[k] - init_model[k]) / np.linalg.norm(init_model[k])
                print(f"  {k:28s} {moved:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
