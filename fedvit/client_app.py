"""Flower ClientApp: a thin adapter from Flower messages to the method's NumPyClient.

Messages (what crosses the wire):

* ``query`` (once per node): a **device** (a node with a node config of its own) replies
  ``metrics`` = {``client-id``, ``num-train``, ``num-val``, ``num-test``, and what the method's
  client adds in ``describe``; ``train-hist`` / ``test-hist`` only when the run asks for them and
  the device agrees (:func:`fedvit.boundary.histograms_asked`)}; the server builds its node ->
  client map from it. A **virtual worker** (a simulated node with only Flower's own node config)
  replies {``virtual-worker``: its 1-based place among the simulated nodes (Flower's
  ``partition-id`` + 1)}; asked again with ``describe-clients`` = [ids] it replies the
  same facts for each listed client as lists (``clients``, ``num-train`` ...; histograms one
  after the other).
* ``train``: content ``arrays`` (the shared parameters by state-dict name, possibly
  personalized by the server) and ``config`` (``server-round``, ``run-name``, ``run-key``,
  ``client-id``; asynchronous runs add ``slowdown``, a simulated device speed). Reply
  ``arrays`` (shared parameters only) and ``metrics``
  (``num-examples``, ``client-id``, ``train-loss`` ...). A *pipelined* ``train`` message
  (``strategies.pipeline``) also carries the previous round's evaluation of this client:
  ``eval-config`` (and ``eval-arrays`` when they differ from ``arrays``); the client evaluates
  first, with its private state as that round left it, then trains, and the reply adds
  ``eval-metrics`` (what an ``evaluate`` reply's ``metrics`` would hold, checked alike).
* ``evaluate``: same content; reply ``metrics`` only (``test-acc``, ``val-acc`` ...).

Every reply passes the allowlist of :mod:`fedvit.boundary` before it is sent: anything beyond the
shared split, these keys and the method's declared metrics (its client's ``REPLY_METRICS``) is
refused with an error naming the key and the method.

A device is one client: ``client-id`` from ``--node-config`` (else Flower's ``partition-id``);
``data-path``, ``state-dir``, ``device`` and ``max-depth`` in the node config point it at its own
data, persistent state directory, accelerator and capability. A virtual worker serves whichever
client a message names (Flower's simulation: N clients on W <= N nodes, see
``fedvit.runner.simulation_workers``); their private state lives on disk in the run directory
(``<run dir>/clients/client-<id>``), never in a node's ``context.state``. Per-process reuse of
models and data between messages: :mod:`fedvit.worker`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (imported at module top, as Flower's ClientApp needs it)
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedvit import worker
from fedvit.boundary import (
    EVALUATE,
    QUERY,
    TRAIN,
    Allowlist,
    allowlist,
    batch_allowlist,
    check_reply,
    histograms_asked,
)
from fedvit.clientsetup import ClientSetup
from fedvit.config import FedvitConfig, fingerprint, load_config, to_dict
from fedvit.params import ParameterSplit
from fedvit.registry import get_client
from fedvit.state import PrivateStore, default_state_dir
from fedvit.training import resolve_device
from fedvit.wire import (
    DESCRIBE,
    EVAL_ARRAYS,
    EVAL_CONFIG,
    EVAL_METRICS,
    VIRTUAL_WORKER,
    pack_client_info,
    to_numpy,
    to_record,
)

app = ClientApp()


@lru_cache(maxsize=8)
def _config(items: tuple[tuple[str, Any], ...]) -> FedvitConfig:
    return load_config(dict(items))


def _config_key(context: Context) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(context.run_config.items()))


def client_config(context: Context) -> FedvitConfig:
    """The run's resolved config (cached per process)."""
    return _config(_config_key(context))


#: Node-config keys Flower's simulation (and fedvit's in-process grid) set by themselves.
SIMULATION_KEYS = frozenset({"partition-id", "num-partitions", "virtual-time"})


def is_virtual_worker(context: Context) -> bool:
    """A simulated node with nothing of its own (no ``client-id``, ``data-path``, ``state-dir``,
    ``device``, ``max-depth`` ...): it serves whichever client a message names (*virtual clients*).
    A node with a node config of its own is a device: it is one client, always the same."""
    node = context.node_config
    return "partition-id" in node and set(node) <= SIMULATION_KEYS


def client_identity(context: Context, cfg: FedvitConfig, config: Mapping[str, Any] | None = None) -> int:
    """The client a message (its ``config``) is for: a device's node-config ``client-id`` (else
    Flower's ``partition-id``); a virtual worker serves the message's ``client-id``."""
    node = context.node_config
    sent = (config or {}).get("client-id")
    if is_virtual_worker(context) and sent is not None:
        raw = sent
    else:
        raw = node.get("client-id", node.get("partition-id"))
    if raw is None:
        raise ValueError("node config needs 'client-id' (or Flower's 'partition-id') to identify this client")
    client_id = int(raw)
    if "data-path" not in node and not 0 <= client_id < cfg.clients.num_clients:
        raise ValueError(
            f"client id {client_id} is outside [0, clients.num_clients={cfg.clients.num_clients}); "
            "start as many SuperNodes as num-clients, or give this node its own data-path"
        )
    if sent is not None and int(sent) != client_id:
        raise ValueError(f"message for client {sent} reached client {client_id}")
    return client_id


def simulated_run_dir(cfg: FedvitConfig, run_name: str) -> Path | None:
    """The run directory as the ServerApp chose it, when it exists on this machine (a simulation:
    the ServerApp writes ``config.yaml`` there before it asks any client); else ``None``."""
    if cfg.server.resume:
        run_dir = Path(cfg.server.resume).expanduser().resolve()
    elif run_name:
        run_dir = Path(cfg.output.dir).expanduser().resolve() / run_name
    else:
        return None
    return run_dir if (run_dir / "config.yaml").is_file() else None


def _state_dir(context: Context, cfg: FedvitConfig, run_key: str, run_name: str, client_id: int) -> Path:
    # A device keeps one personal model per (method, model, dataset) across runs.
    keep = f"{cfg.method.name}-{cfg.model.name}-{cfg.data.name}"
    if node_dir := context.node_config.get("state-dir"):  # this device's own directory
        return Path(str(node_dir)).expanduser() / keep
    if cfg.clients.state_dir:  # one directory for the whole federation
        return Path(cfg.clients.state_dir).expanduser() / f"client-{client_id}" / keep
    if "client-id" not in context.node_config and (run_dir := simulated_run_dir(cfg, run_name)) is not None:
        return run_dir / "clients" / f"client-{client_id}"  # simulation: the state goes with the run
    return default_state_dir(run_key, client_id)


def _datasets(cfg: FedvitConfig, key: tuple, client_id: int, data_path: str | None):
    """Client ``client_id``'s datasets, reused while the config and the data files are unchanged."""
    from fedvit.data import load_client_datasets
    from fedvit.data.sources import source_identity

    stamp = repr(source_identity(cfg.data, data_path))
    return worker.cached(
        "datasets",
        (key, client_id, data_path, stamp),
        lambda: load_client_datasets(cfg, client_id, data_path=data_path),
    )


def _pool(cfg: FedvitConfig, key: tuple) -> worker.ModelPool:
    from fedvit.models import build_model

    return worker.cached("pools", key, lambda: worker.ModelPool(lambda: build_model(cfg)))


def _split(cfg: FedvitConfig, key: tuple, model) -> ParameterSplit:
    """The configuration's parameter split (the same for every model of its pool)."""
    return worker.cached("splits", key, lambda: ParameterSplit.from_model(model, cfg.method.private))


def _device(context: Context, cfg: FedvitConfig):
    """The node's ``device`` (node config), else ``clients.device``."""
    return resolve_device(str(context.node_config.get("device", cfg.clients.device)))


def _store_fingerprint(cfg: FedvitConfig, key: tuple, model, split: ParameterSplit) -> str:
    return worker.cached(
        "fingerprints",
        (key, tuple(split.private)),
        lambda: fingerprint(
            {
                "method": cfg.method.name,
                "model": to_dict(cfg)["model"],
                "private": split.shapes(model, "private"),
            }
        ),
    )


@contextmanager
def client_setup(message: Message | None, context: Context) -> Iterator[ClientSetup]:
    """The model, split, data and private store of the client ``message`` is for.

    The model comes pristine from this process's :class:`~fedvit.worker.ModelPool` and goes back
    when the block ends; datasets and the store fingerprint are reused between messages of the
    same configuration (:mod:`fedvit.worker`); private state is read from the store as always."""
    with _setup_of(_config_dict(message) if message is not None else {}, context) as setup:
        yield setup


@contextmanager
def _setup_of(config: Mapping[str, Any], context: Context) -> Iterator[ClientSetup]:
    """:func:`client_setup` for a message with this ``config``."""
    with setup_for(context, client_identity(context, client_config(context), config), config) as setup:
        yield setup


@contextmanager
def setup_for(context: Context, client_id: int, config: Mapping[str, Any]) -> Iterator[ClientSetup]:
    """:func:`client_setup` for a known ``client_id`` (``config``: the message's config)."""
    cfg = client_config(context)
    key = _config_key(context)
    run_name = str(config.get("run-name", ""))
    run_key = str(config.get("run-key", run_name or "default"))
    pool = _pool(cfg, key)
    model = pool.acquire()
    try:
        split = _split(cfg, key, model)
        data_path = context.node_config.get("data-path")
        data = _datasets(cfg, key, client_id, str(data_path) if data_path else None)
        store = PrivateStore(
            _state_dir(context, cfg, run_key, run_name, client_id),
            fingerprint=_store_fingerprint(cfg, key, model, split),
            # a virtual worker serves many clients, and a client many workers: disk only
            context_state=None if is_virtual_worker(context) else context.state,
            context_max_bytes=int(cfg.clients.context_state_max_mb * 2**20),
        )
        yield ClientSetup(
            cfg, client_id, model, split, data, store, _device(context, cfg), dict(context.node_config)
        )
    finally:
        pool.release(model)


@contextmanager
def client_for(config: Mapping[str, Any], context: Context) -> Iterator[Any]:
    """The method's client for a message with this ``config`` (its model returns to the pool
    when the block ends)."""
    with _setup_of(config, context) as setup:
        yield get_client(setup.cfg.method.client)(setup)


def _traced(kind: str, config: Mapping[str, Any]):
    """:func:`fedvit.worker.traced` for a message with this ``config``."""
    client = config.get("client-id")
    return worker.traced(
        kind, None if client is None else int(client), int(config.get("server-round", 0)) or None
    )


def _config_dict(message: Message) -> dict[str, Any]:
    record = message.content.config_records.get("config")
    return dict(record) if record is not None else {}


def _received(message: Message, client, record_name: str = "arrays") -> list:
    """The shared arrays of ``message``'s record ``record_name``, in the client's split order."""
    record = message.content.array_records.get(record_name, ArrayRecord())
    arrays = to_numpy(record)
    expected = set(client.split.shared)
    if set(arrays) != expected:
        unknown, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
        raise ValueError(f"server sent unknown {unknown[:5]} / lacks {missing[:5]} shared parameters")
    return [arrays[k] for k in client.split.shared]


def simulate_slowdown(slowdown: float, elapsed: float, context: Context) -> None:
    """A simulated slow device (asynchronous experiments): wait ``(slowdown − 1) × elapsed``.
    Nodes on a virtual clock (``virtual-time`` in the node config, the in-process grid) skip it."""
    if slowdown > 1.0 and not context.node_config.get("virtual-time", False):
        time.sleep((slowdown - 1.0) * elapsed)


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Tell the server who this node is: a device names its client and its data sizes; a virtual
    worker says so, and describes the clients listed in ``describe-clients`` when asked."""
    config = _config_dict(message)
    if is_virtual_worker(context):
        # its place among the simulated nodes, 1-based: Flower queues their messages in that order
        metrics: dict[str, Any] = {VIRTUAL_WORKER: 1 + int(context.node_config.get("partition-id", 0))}
        ids = [int(c) for c in config.get(DESCRIBE, [])]
        with _traced("describe" if ids else "query", config):
            rows, allowed = _describe_many(context, ids) if ids else ([], None)
            metrics.update(pack_client_info(ids, rows))
        content = RecordDict({"metrics": MetricRecord(metrics)})
        check_reply(content, batch_allowlist(client_config(context).method.name, allowed, len(ids)))
        return Message(content, reply_to=message)
    with client_setup(None, context) as setup:
        histograms = histograms_asked(setup, virtual=False)
        content = RecordDict(
            {"metrics": MetricRecord({"client-id": setup.client_id, **describe(setup, histograms)})}
        )
        check_reply(content, _allowlist(QUERY, setup, histograms=histograms))
    return Message(content, reply_to=message)


def _allowlist(kind: str, setup: ClientSetup, **kwargs: Any) -> Allowlist:
    """The allowlist (:mod:`fedvit.boundary`) of a ``kind`` reply of this client."""
    return allowlist(kind, get_client(setup.cfg.method.client), setup, **kwargs)


def _describe_many(context: Context, ids: list[int]):
    """:func:`describe` for each of ``ids`` (a virtual worker's batched query), with one pristine
    model for all of them and no private store (nothing is trained or loaded); and the allowlist of
    one client's description."""
    cfg = client_config(context)
    key = _config_key(context)
    bad = [c for c in ids if not 0 <= c < cfg.clients.num_clients]
    if bad:
        raise ValueError(f"asked to describe clients {bad[:5]}, outside [0, clients.num_clients)")
    pool = _pool(cfg, key)
    model = pool.acquire()
    try:
        split, device, node = _split(cfg, key, model), _device(context, cfg), dict(context.node_config)
        setups = [
            ClientSetup(cfg, c, model, split, _datasets(cfg, key, c, None), None, device, node) for c in ids
        ]
        histograms = histograms_asked(setups[0], virtual=True)
        allowed = _allowlist(QUERY, setups[0], histograms=histograms)
        return [describe(s, histograms) for s in setups], allowed
    finally:
        pool.release(model)


def describe(setup: ClientSetup, histograms: bool = False) -> dict[str, Any]:
    """What the server records about a client: its split sizes, what the method's client says
    about itself (``PartialClient.describe``, e.g. anytime's tier) and, with ``histograms`` (the
    run asks for them: :func:`fedvit.boundary.histograms_asked`), its label histograms."""
    data = setup.data
    out: dict[str, Any] = {"num-train": len(data.train), "num-val": len(data.val), "num-test": len(data.test)}
    if histograms:
        out["train-hist"] = [int(v) for v in data.label_histograms["train"]]
        out["test-hist"] = [int(v) for v in data.label_histograms["test"]]
    return {**out, **get_client(setup.cfg.method.client).describe(setup)}


@app.train()
def train(message: Message, context: Context) -> Message:
    """Local training; replies with the shared split only. A pipelined message
    (:data:`~fedvit.wire.EVAL_CONFIG` in it) first evaluates, as an ``evaluate`` message of the
    round before would, and its reply adds :data:`~fedvit.wire.EVAL_METRICS`."""
    config = _config_dict(message)
    evaluated = None
    if EVAL_CONFIG in message.content.config_records:
        eval_arrays = EVAL_ARRAYS if EVAL_ARRAYS in message.content.array_records else "arrays"
        evaluated = _evaluation(message, dict(message.content[EVAL_CONFIG]), context, eval_arrays)
    started = time.perf_counter()
    with _traced("train", config), client_for(config, context) as client:
        params, num_examples, metrics = client.fit(_received(message, client), config)
        shared, client_id = client.split.shared, client.client_id
        allowed = _allowlist(TRAIN, client.setup, shared=list(shared))
    simulate_slowdown(float(config.get("slowdown", 1.0)), time.perf_counter() - started, context)
    arrays = to_record(dict(zip(shared, params, strict=True)))
    reply = MetricRecord({**metrics, "num-examples": num_examples, "client-id": client_id})
    content = RecordDict({"arrays": arrays, "metrics": reply})
    check_reply(content, allowed)
    if evaluated is not None:  # checked as an evaluate reply by _evaluation
        content[EVAL_METRICS] = evaluated
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate this client's personalized model on its own val and test splits."""
    metrics = _evaluation(message, _config_dict(message), context, "arrays")
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


def _evaluation(message: Message, config: dict[str, Any], context: Context, record: str) -> MetricRecord:
    """The ``metrics`` of an evaluate reply for ``message``'s arrays ``record`` and ``config``,
    checked against the evaluate allowlist. Its own client: nothing it does to the model or its
    state reaches a training that follows in the same message."""
    with _traced("evaluate", config), client_for(config, context) as client:
        loss, num_examples, metrics = client.evaluate(_received(message, client, record), config)
        client_id = client.client_id
        allowed = _allowlist(EVALUATE, client.setup)
    reply = MetricRecord({**metrics, "loss": loss, "num-examples": num_examples, "client-id": client_id})
    check_reply(RecordDict({"metrics": reply}), allowed)
    return reply
