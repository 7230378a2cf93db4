"""The base pFL client: a Flower ``NumPyClient`` that keeps the private split at home.

What crosses the wire (through the ClientApp adapter in ``fedvit.client_app``):

* ``fit`` receives the shared parameters (in ``split.shared`` order), trains the
  personalized model (shared + private parameters) locally, saves the private parameters
  to its :class:`~fedvit.state.PrivateStore` and returns **only the shared parameters**,
  the number of training examples and its metrics.
* ``evaluate`` receives the latest aggregated shared parameters, combines them with its
  own private parameters (its personalized model) and reports loss/accuracy on its own
  validation and test splits. Nothing is trained and nothing private is returned.

Override points for methods: :meth:`local_train` (what local training does, e.g. FedRep's
alternating phases), :meth:`personalize_for_eval` (e.g. FedBABU's head fine-tuning) and
:meth:`shared_update` (what is sent back, e.g. a pseudo-gradient instead of weights).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from flwr.client import NumPyClient
from torch import nn

from fedvit.clientsetup import ClientSetup
from fedvit.export import ExportPolicy
from fedvit.params import check_arrays, get_arrays, set_arrays
from fedvit.registry import method_options, register_client
from fedvit.training import EvalResult, TrainResult, evaluate, make_loader, train_local

if TYPE_CHECKING:
    from fedvit.config import FedvitConfig


@contextmanager
def trainable_only(model: nn.Module, keys: Iterable[str]) -> Iterator[list[nn.Parameter]]:
    """Freeze every parameter of ``model`` whose name is not in ``keys`` (state-dict names);
    yields the trainable ones and restores every ``requires_grad`` flag on exit.

    For methods that train one part at a time (FedRep, FedAlt, FedBABU):
    ``with trainable_only(model, split.private) as params: train_local(..., params=params)``."""
    keys = set(keys)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name] and name in keys)
        yield [p for name, p in model.named_parameters() if p.requires_grad]
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])


@register_client("partial")
class PartialClient(NumPyClient):
    """Trains shared and private parameters together (FedAvg, Local, FedPer, FedBN ...)."""

    def __init__(self, setup: ClientSetup) -> None:
        self.setup = setup
        self.cfg = setup.cfg
        self.client_id = setup.client_id
        self.model = setup.model
        self.split = setup.split
        self.data = setup.data
        self.device = setup.device
        self.options = method_options(self.cfg)[0]
        self.shared_shapes = self.split.shapes(self.model, "shared")
        private = setup.store.load(self.private_state_shapes())
        if private:
            self.restore_private_state(private)

    # ------------------------------------------------------------------ private state

    def private_state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of everything this client keeps between rounds (never sent).

        Default: the private split of the model. Methods with more private state (APFL's
        private model and mixing weight) extend the three ``private_state`` methods."""
        return self.split.shapes(self.model, "private")

    def private_state(self) -> dict[str, np.ndarray]:
        """The current private state, as saved to the client's store after training."""
        return get_arrays(self.model, self.split.private)

    def restore_private_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Load what :meth:`private_state` saved (in an earlier round or run)."""
        set_arrays(self.model, arrays)

    # ------------------------------------------------------------------ what leaves the client

    #: The named metrics this method's replies carry, per message type (``query``: what
    #: :meth:`describe` adds; ``train``: what :meth:`fit` reports; ``evaluate``), beyond the keys
    #: every reply carries (``num-examples``, ``client-id`` ...: :mod:`fedvit.boundary`). A subclass
    #: declares only its additions (they are joined over the class hierarchy); the ClientApp
    #: refuses a reply with a metric nobody declared.
    REPLY_METRICS: ClassVar[Mapping[str, Iterable[str]]] = {
        "train": ("train-loss", "train-acc", "num-steps"),
        "evaluate": ("test-acc", "test-loss", "num-test", "val-acc", "val-loss", "num-val"),
    }

    @classmethod
    def reply_metrics(cls, setup: ClientSetup) -> dict[str, frozenset[str]]:
        """The allowlist's named metrics per message type: every ``REPLY_METRICS`` of the class
        hierarchy joined. Methods whose metric names depend on the model (anytime's exits) extend it."""
        out: dict[str, set[str]] = {}
        for klass in reversed(cls.__mro__):
            for kind, names in vars(klass).get("REPLY_METRICS", {}).items():
                out.setdefault(kind, set()).update(names)
        return {kind: frozenset(names) for kind, names in out.items()}

    @staticmethod
    def describe(setup: ClientSetup) -> dict[str, Any]:
        """What this client tells the server when it identifies itself (the query reply), beyond
        its id and data sizes; the server keeps it as ``client_info``. Methods whose clients
        differ in capability (anytime's device tier) override it, and declare its keys under
        ``query`` in ``REPLY_METRICS``."""
        return {}

    # ------------------------------------------------------------------ export (fedvit.export)

    #: How ``fedvit export`` builds this client's personalized model: exportable unless a subclass
    #: overrides an evaluation hook; the stored private keys; no exits to cut at. A method whose
    #: model is exported differently declares its own policy (anytime: ``clients.anytime``).
    export: ClassVar[ExportPolicy] = ExportPolicy()

    # ------------------------------------------------------------------ resources

    @staticmethod
    def adjust_resources(
        resources: dict[str, float], model: nn.Module, cfg: FedvitConfig
    ) -> dict[str, float]:
        """The method's real footprint under ``cfg``, from the split-based counts of
        :func:`fedvit.evaluation.resource_counts` (the server reports what this returns).
        Methods that store or compute more than their model split (APFL) override it."""
        return resources

    # ------------------------------------------------------------------ wire format

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        """The shared parameters, in ``split.shared`` order."""
        arrays = get_arrays(self.model, self.split.shared)
        return [arrays[k] for k in self.split.shared]

    def set_parameters(self, parameters: list[np.ndarray]) -> None:
        """Load shared parameters received from the server (``split.shared`` order)."""
        if len(parameters) != len(self.split.shared):
            raise ValueError(f"expected {len(self.split.shared)} shared arrays, got {len(parameters)}")
        arrays = dict(zip(self.split.shared, parameters, strict=True))
        check_arrays(arrays, self.shared_shapes, who="server")
        set_arrays(self.model, arrays)

    def save_private(self) -> None:
        self.setup.store.save(self.private_state())

    # ------------------------------------------------------------------ Flower API

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        self.set_parameters(parameters)
        server_round = int(config.get("server-round", 0))
        result = self.local_train(server_round)
        self.save_private()
        metrics = {
            "train-loss": result.loss,
            "train-acc": result.accuracy,
            "num-steps": result.num_steps,
        }
        return self.shared_update(), len(self.data.train), metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        self.set_parameters(parameters)
        self.personalize_for_eval(int(config.get("server-round", 0)))
        test = self._eval(self.data.test)
        val = self._eval(self.data.val)
        metrics = {
            "test-acc": test.accuracy,
            "test-loss": test.loss,
            "num-test": test.num_examples,
            "val-acc": val.accuracy,
            "val-loss": val.loss,
            "num-val": val.num_examples,
        }
        return test.loss, test.num_examples, metrics

    # ------------------------------------------------------------------ override points

    def local_train(self, server_round: int) -> TrainResult:
        """Train every trainable parameter (shared and private) on the local train split."""
        loader = self.train_loader(server_round)
        return train_local(self.model, loader, self.cfg.train, self.device)

    def personalize_for_eval(self, server_round: int) -> None:
        """Adapt the model before evaluation (no-op: the personalized model is used as is)."""

    def shared_update(self) -> list[np.ndarray]:
        """What goes back to the server: the shared parameters after local training."""
        return self.get_parameters({})

    # ------------------------------------------------------------------ helpers

    def train_loader(self, server_round: int):
        seed = self.cfg.seed * 1_000_003 + server_round * 10_007 + self.client_id
        return make_loader(
            self.data.train,
            self.cfg.train.batch_size,
            shuffle=True,
            seed=seed,
            workers=self.cfg.data.num_workers,
        )

    def _eval(self, dataset) -> EvalResult:
        loader = make_loader(
            dataset, self.cfg.train.eval_batch_size, shuffle=False, workers=self.cfg.data.num_workers
        )
        return evaluate(self.model, loader, self.device)
