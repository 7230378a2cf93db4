"""The sections of a run's federation (``train``, ``server``, ``clients``, ``output``, ``dp``) and
:class:`FedvitConfig`, the whole configuration, whose ``validate`` has every section check itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedvit.config.checks import OPTIMIZERS, check
from fedvit.config.sections import DataConfig, MethodConfig, ModelConfig


@dataclass
class TrainConfig:
    """The client's local training."""

    local_epochs: int = 1
    local_steps: int | None = None  # if set, overrides local_epochs
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    amp: bool = True  # only on CUDA

    def validate(self) -> None:
        """``train``: positive lengths and sizes, a known optimizer with sane hyperparameters."""
        check(self.local_epochs >= 1, "train.local_epochs", f"must be >= 1, got {self.local_epochs}")
        if self.local_steps is not None:
            check(self.local_steps >= 1, "train.local_steps", f"must be >= 1, got {self.local_steps}")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")
        check(
            self.optimizer in OPTIMIZERS,
            "train.optimizer",
            f"must be one of {OPTIMIZERS}, got '{self.optimizer}'",
        )
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        if self.grad_clip is not None:
            check(self.grad_clip > 0, "train.grad_clip", "must be > 0 (or null to disable)")


@dataclass
class ServerConfig:
    """Round structure, sampling, evaluation cadence, checkpoints."""

    num_rounds: int = 3
    fraction_train: float = 1.0
    min_train_clients: int = 1
    min_available_clients: int | None = None  # None: every client (clients.num_clients)
    eval_every: int = 1
    # Sampled evaluation: each evaluated round asks this share of the live clients (seeded by seed
    # and round, independent of the training sample); 1.0 (default) evaluates every client.
    eval_fraction: float = 1.0
    eval_min_clients: int = 1  # a sampled round asks at least this many clients
    # Rounds where every client is evaluated whatever eval_fraction is (also evaluated when not a
    # multiple of eval_every); the last round always is.
    eval_full_rounds: list[int] = field(default_factory=list)
    round_timeout: float = 3600.0
    # A round's evaluation is sent with the next round's training, in one exchange (the same
    # messages' work, one barrier a round instead of two: strategies.pipeline); false: its own.
    pipeline_evaluation: bool = True
    checkpoint: bool = True
    resume: str | None = None  # a run directory (outputs/<run>) to continue

    def validate(self, num_clients: int) -> None:
        """``server`` for a federation of ``num_clients`` clients."""
        check(self.num_rounds >= 1, "server.num_rounds", f"must be >= 1, got {self.num_rounds}")
        check(
            0 < self.fraction_train <= 1,
            "server.fraction_train",
            f"must be in (0, 1], got {self.fraction_train}",
        )
        check(self.min_train_clients >= 1, "server.min_train_clients", "must be >= 1")
        check(
            self.min_train_clients <= num_clients,
            "server.min_train_clients",
            f"{self.min_train_clients} > clients.num_clients ({num_clients})",
        )
        if self.min_available_clients is not None:
            check(
                1 <= self.min_available_clients <= num_clients,
                "server.min_available_clients",
                f"must be in [1, clients.num_clients={num_clients}], got {self.min_available_clients}",
            )
        check(self.eval_every >= 1, "server.eval_every", f"must be >= 1, got {self.eval_every}")
        check(
            0 < self.eval_fraction <= 1,
            "server.eval_fraction",
            f"must be in (0, 1], got {self.eval_fraction}",
        )
        check(
            1 <= self.eval_min_clients <= num_clients,
            "server.eval_min_clients",
            f"must be in [1, clients.num_clients={num_clients}], got {self.eval_min_clients}",
        )
        check(
            all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.eval_full_rounds),
            "server.eval_full_rounds",
            f"must be round numbers >= 1, got {list(self.eval_full_rounds)}",
        )
        check(self.round_timeout > 0, "server.round_timeout", "must be > 0")


@dataclass
class ClientsConfig:
    """The federation's clients."""

    num_clients: int = 3
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # <state_dir>/client-<id>/<method>-<model>-<dataset>; default: in simulation
    # <run dir>/clients/client-<id>, for a device without node-config state-dir
    # ~/.cache/fedvit/state/<run-key>/client-<id>
    state_dir: str | None = None
    context_state_max_mb: float = 32.0  # private state above this goes to disk only

    def validate(self) -> None:
        """``clients``: at least one, on a device torch can name."""
        check(self.num_clients >= 1, "clients.num_clients", f"must be >= 1, got {self.num_clients}")
        check(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            "clients.device",
            f"must be auto, cpu, cuda or cuda:N, got '{self.device}'",
        )
        check(self.context_state_max_mb >= 0, "clients.context_state_max_mb", "must be >= 0")


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "outputs"
    run_name: str | None = None  # default: <method>-<dataset>-<timestamp>
    plots: bool = True
    tensorboard: bool = True  # TensorBoard event files in <run dir>/tb/ (fedvit.tensorboard)
    # clients send train/test label histograms (results.json "clients"; a device also needs its
    # node config label-histograms=true): simulation reporting, off by default (fedvit.boundary)
    label_histograms: bool = False


@dataclass
class PrivacyConfig:
    """Client-level differential privacy of the shared split (fedvit.privacy, docs/privacy.md)."""

    enabled: bool = False
    clip: float = 1.0  # L2 bound of each client's shared update
    noise_multiplier: float | None = None  # z: noise std z*clip/(clients per round) on the mean update
    target_epsilon: float | None = None  # instead of z: the z that reaches this epsilon after num_rounds
    delta: float = 1e-5  # must be < 1/clients.num_clients
    sampling: str = "poisson"  # accounting: poisson (rate = clients per round / clients) | none (rate 1)


@dataclass
class FedvitConfig:
    """The whole, validated configuration of one run."""

    seed: int = 0
    experiment: str | None = None
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dp: PrivacyConfig = field(default_factory=PrivacyConfig)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first impossible value, naming its key. Each section
        checks itself, given the sections it depends on; imports neither torch nor flwr (unless
        ``model.pretrained`` names timm weights, or ``dp`` asks the strategy whether it supports DP)."""
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        self.server.validate(self.clients.num_clients)
        self.clients.validate()
        self.train.validate()
        self.data.validate()
        self.model.validate(self.data)
        self.method.validate(self.model)
        if self.dp.enabled:
            from fedvit.privacy import check as check_privacy

            check_privacy(self)  # dp: its values, and whether the method's strategy accepts it
