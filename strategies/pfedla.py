"""pFedLA and HeurpFedLA (Ma et al., CVPR 2022): layer-wise personalized aggregation, with one
server hypernetwork per client that outputs its aggregation weights α_i^l over all clients.

What crosses the wire, per sampled client i and round:

* ``train`` to client i: ``arrays`` = θ̄_i, its **personalized aggregate** of every shared
  tensor, ``θ̄_i^l = Σ_j α_ij^l θ_j^l`` over the server's stored models θ_j (layer l: see
  :func:`fedvit.layeragg.aggregation_layers`). No two clients receive the same model; nothing
  global is sent. The client is the ordinary ``partial`` client: it loads θ̄_i (not a copy of its
  own previous model), trains, and replies with its shared parameters. Keys of ``method.private``
  groups (if any) never leave the client and are neither stored nor aggregated.
* Server: ``Δ_i = θ̄_i − θ_i(returned)``; HN_i takes one SGD step along the vector–Jacobian
  product of α_i with ``<θ_j^l, Δ_i^l>`` (descent on client i's loss); then θ_i ← returned.
  Each HN is updated by its own client only.
* ``evaluate`` to every client: the θ̄_i the server computes for it *now* (after the round's
  updates of the models and hypernetworks), so the number reported is the model the client would
  receive next. A client that never trained still has θ_i = the seeded initial model.

HeurpFedLA (``heur_k`` K > 0; ``conf/method/heurpfedla.yaml``): for each client the K layers with
the largest self weight α_ii^l are one-hot on self that round (client i gets its own θ_i^l there),
and their heads are not updated.

Server memory: the N models live on disk (:class:`fedvit.modelstore.ModelStore`, one float32
``.npy`` per client under ``<run dir>/model-store/``, written atomically as new versions and
garbage-collected after each checkpoint), θ̄_i is streamed client by client; the N hypernetworks
(``N·L·(hidden+1)·N`` head parameters: quadratic in N) and their optimizer states stay in memory
and are checkpointed with the store's version map. Flower itself still holds a round's messages
(every sampled client's θ̄_i and reply) in memory while the round runs.

After every round the strategy writes ``<run dir>/alpha.npz`` (:mod:`strategies.pfedla_alpha`): every
client's α_i (``[N, L, N]``, as its hypernetwork gives it now, and as used with HeurpFedLA's
kept-local layers one-hot), the layer names, the round and the trained clients; after the last
round, with ``output.plots``, also ``alpha.png`` (one heatmap per layer; ``fedvit alpha RUN_DIR``
draws it again).

Options (``method.options``): ``embed_dim`` 100, ``hidden`` 100, ``n_layers`` 3, ``hn_lr`` 0.005,
``hn_momentum`` 0.0, ``hn_weight_decay`` 0.0, ``granularity`` block | tensor, ``heur_k`` 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedvit.layeragg import GRANULARITIES, LayerAggregation, aggregation_layers
from fedvit.params import get_arrays
from fedvit.registry import method_options, option_error, register_strategy
from fedvit.wire import to_record
from strategies.base import PersonalizedStrategy
from strategies.pfedla_alpha import ALPHA_FILE, AlphaMatrix, plot_alpha, save_alpha
from strategies.rounds import ClientUpdate, Payload, RoundPlan

STORE_DIR = "model-store"


@register_strategy("pfedla")
class PFedLAStrategy(PersonalizedStrategy):
    """Per-client messages θ̄_i = Σ_j α_ij θ_j (layer-wise); per-client hypernetworks learn α_i."""

    exportable = False  # every client gets its own θ̄_i, which the checkpoint does not hold
    dp_refusal = (
        "each client receives its own aggregate θ̄_i = Σ_j α_ij θ_j of the stored client models, "
        "which hold every client's update as it was sent; no single noised aggregate exists"
    )

    @dataclass
    class Options:
        embed_dim: int = 100
        hidden: int = 100
        n_layers: int = 3
        hn_lr: float = 0.005
        hn_momentum: float = 0.0
        hn_weight_decay: float = 0.0
        granularity: str = "block"  # block | tensor
        heur_k: int = 0  # 0: pFedLA; K > 0: HeurpFedLA keeps K layers local per client and round

        def __post_init__(self) -> None:
            for key in ("embed_dim", "hidden"):
                if getattr(self, key) < 1:
                    raise option_error(key, f"must be >= 1, got {getattr(self, key)}")
            for key in ("n_layers", "heur_k"):
                if getattr(self, key) < 0:
                    raise option_error(key, f"must be >= 0, got {getattr(self, key)}")
            if not self.hn_lr > 0:
                raise option_error("hn_lr", f"must be > 0, got {self.hn_lr}")
            if not 0 <= self.hn_momentum < 1:
                raise option_error("hn_momentum", f"must be in [0, 1), got {self.hn_momentum}")
            if self.hn_weight_decay < 0:
                raise option_error("hn_weight_decay", f"must be >= 0, got {self.hn_weight_decay}")
            if self.granularity not in GRANULARITIES:
                raise option_error("granularity", f"must be one of {GRANULARITIES}, got '{self.granularity}'")

    #: Options that shape the saved state: a resumed run must use the same.
    STRUCTURAL = ("embed_dim", "hidden", "n_layers", "granularity")

    @classmethod
    def from_config(cls, cfg, *, model, split, run_dir: Path, **kwargs: Any):
        options = method_options(cfg)[1]
        layers = aggregation_layers(model, split.shared, options.granularity)
        if options.heur_k >= len(layers):
            log(
                INFO, "heur_k=%d >= %d layers: every layer stays local (= Local)", options.heur_k, len(layers)
            )
        return super().from_config(
            cfg,
            model=model,
            split=split,
            run_dir=run_dir,
            options=options,
            layers=layers,
            initial=get_arrays(model, split.shared),
            store_dir=Path(run_dir) / STORE_DIR,
            alpha_file=Path(run_dir) / ALPHA_FILE,
            plot_alpha_at_end=bool(cfg.output.plots),
            **kwargs,
        )

    def __init__(
        self,
        *,
        layers: dict[str, list[str]],
        initial: dict[str, np.ndarray],
        store_dir: Path,
        options: Options | None = None,
        alpha_file: Path | None = None,
        plot_alpha_at_end: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.alpha_file = alpha_file  # where α is written after every round (None: not written)
        self.plot_alpha_at_end = plot_alpha_at_end
        self.options = o = options if options is not None else self.Options()
        self.layers = layers
        self.agg = LayerAggregation(
            layers,
            initial,
            self.num_clients,
            store_dir,
            embed_dim=o.embed_dim,
            hidden=o.hidden,
            n_layers=o.n_layers,
            hn_lr=o.hn_lr,
            hn_momentum=o.hn_momentum,
            hn_weight_decay=o.hn_weight_decay,
            heur_k=o.heur_k,
            seed=self.seed,
        )
        self.trained: list[int] = []  # clients whose update reached their hypernetwork

    def server_resources(self) -> dict[str, float]:
        store = self.agg.store
        return {
            "hypernetwork_params": self.agg.hypernet_parameters(),
            "aggregation_layers": self.agg.num_layers,
            "model_store_params": store.size * self.num_clients,
            "model_store_bytes_on_disk": store.nbytes_on_disk(),
        }

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> pFedLA (%s layers: %d, heur_k %d): %s hypernetwork parameters; models in %s",
            self.options.granularity,
            self.agg.num_layers,
            self.options.heur_k,
            f"{self.agg.hypernet_parameters():,}",
            self.agg.store.root,
        )
        super().summary()

    # ------------------------------------------------------------------ per-client messages

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> tuple[list[Message], RoundPlan]:
        """The base's messages; the plan notes the store's versions the θ̄_i are built from (the
        hypernetwork update recomputes θ̄_i from them instead of keeping what was sent)."""
        versions = tuple(self.agg.store.versions)
        messages, plan = super().configure_train(server_round, arrays, config, grid)
        return messages, replace(plan, note={"versions": versions})

    def train_arrays(self, server_round: int, client_id: int, arrays: ArrayRecord) -> Payload:
        """θ̄_i, client ``client_id``'s personalized aggregate of the stored models (also what
        it is evaluated with: :meth:`evaluate_arrays` is this)."""
        if not 0 <= client_id < self.num_clients:
            raise ValueError(
                f"client {client_id} has no hypernetwork (clients.num_clients={self.num_clients})"
            )
        return Payload(to_record(self.agg.personalized(client_id)))

    def aggregate_shared(self, plan: RoundPlan, updates: list[ClientUpdate]) -> ArrayRecord:
        """HN_i steps and θ_i ← returned for each update; the returned record is the run's
        unused "global" model (the round's, passed through)."""
        for u in updates:
            self.agg.update(u.client_id, u.arrays, version=plan.server_round, versions=plan.note["versions"])
        self.trained = sorted(set(self.trained) | {u.client_id for u in updates})
        return plan.arrays

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """The checkpoint records the store's versions; only then are older files deleted. Then
        α as it stands after this round goes to ``alpha.npz`` (and, after the last round, its plot)."""
        super().save_checkpoint(server_round, arrays)
        self.agg.store.commit()
        if self.alpha_file is not None:
            save_alpha(self.alpha_file, self.alpha_matrix(server_round))
            if self.plot_alpha_at_end and server_round == self.num_rounds:
                try:
                    log(INFO, "[fedvit] α heatmaps: %s", plot_alpha(self.alpha_file))
                except Exception as err:  # a plot must not fail a finished run
                    log(INFO, "[fedvit] α heatmaps not drawn: %s: %s", type(err).__name__, err)

    def alpha_matrix(self, server_round: int) -> AlphaMatrix:
        """Every client's α now: ``alpha`` as its hypernetwork gives it, ``alpha_used`` with
        HeurpFedLA's kept-local layers one-hot (what θ̄_i is built from)."""
        with torch.no_grad():
            raw = np.stack([h().numpy().astype(np.float64) for h in self.agg.hnets])
        used = np.stack([self.agg.weights(i) for i in range(self.num_clients)])
        return AlphaMatrix(
            raw, used, list(self.agg.layer_names), server_round, list(self.trained), self.options.heur_k
        )

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        state = {
            "trained": self.trained,
            "versions": list(self.agg.store.versions),
            "layers": self.agg.layer_names,
            "pfedla": asdict(self.options),
        }
        return self.agg.state_arrays(), state

    def load_state_dict(self, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
        saved = state.get("pfedla", {})
        for key in self.STRUCTURAL:
            if key in saved and saved[key] != getattr(self.options, key):
                raise ValueError(
                    f"server.resume: the checkpoint's pFedLA state has {key}={saved[key]!r}, "
                    f"this run uses {getattr(self.options, key)!r}"
                )
        if state.get("layers", self.agg.layer_names) != self.agg.layer_names:
            raise ValueError("server.resume: the checkpoint's aggregation layers differ from this run's")
        self.agg.load_state_arrays(arrays, state.get("versions", [0] * self.num_clients))
        self.trained = [int(c) for c in state.get("trained", [])]
