"""What may leave a client: the allowlist every ClientApp reply passes before it is sent.

The ClientApp adapter (:mod:`fedvit.client_app`) calls :func:`check_reply` on every reply of every
message type; a reply carrying anything else is refused with a :class:`BoundaryError` that names
the key and the method (never silently dropped, so a method that starts reporting something new
fails its first test instead of leaking it). Per message type a reply may carry:

* ``query`` from a **device**: ``metrics`` = ``client-id``, ``num-train``, ``num-val``,
  ``num-test``, the method's declared ``query`` metrics (anytime: ``tier``) and, only when
  :func:`histograms_asked`, ``train-hist`` / ``test-hist`` (one count per class).
* ``query`` from a **virtual worker**: ``metrics`` = ``virtual-worker``; asked to describe
  clients, also ``clients`` (their ids) and, for each of them, the device keys above as lists
  (one value per client; the histograms one after the other).
* ``train``: ``arrays`` = exactly the client's shared split (state-dict names); ``metrics`` =
  ``num-examples``, ``client-id`` and the method's declared ``train`` metrics.
* ``evaluate``: ``metrics`` = ``num-examples``, ``client-id``, ``loss`` and the method's declared
  ``evaluate`` metrics.

Metric values are single numbers except the histograms and a virtual worker's per-client lists.
A method declares its named metrics in one place, its client class's ``REPLY_METRICS``
(:meth:`clients.base.PartialClient.reply_metrics`); this module reaches it through the class the
registry returns, without importing any method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import RecordDict

from fedvit.clientsetup import ClientSetup
from fedvit.wire import VIRTUAL_WORKER

QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"
KINDS = (QUERY, TRAIN, EVALUATE)
ARRAYS, METRICS = "arrays", "metrics"
#: The label histograms a client sends only when the run asks for them (and a device agrees).
HISTOGRAMS = ("train-hist", "test-hist")
#: Node-config key with which a device agrees to send its label histograms.
NODE_HISTOGRAMS_KEY = "label-histograms"
#: What a client says about itself in a ``query`` reply, whatever its method.
IDENTITY = frozenset({"client-id", "num-train", "num-val", "num-test"})
#: Metrics every reply of a message type may carry, besides the method's declared ones.
COMMON: dict[str, frozenset[str]] = {
    QUERY: IDENTITY,
    TRAIN: frozenset({"num-examples", "client-id"}),
    EVALUATE: frozenset({"num-examples", "client-id", "loss"}),
}
#: The records a reply of each message type may hold.
RECORDS: dict[str, frozenset[str]] = {
    QUERY: frozenset({METRICS}),
    TRAIN: frozenset({ARRAYS, METRICS}),
    EVALUATE: frozenset({METRICS}),
}
#: A virtual worker's batched description lists the clients it describes under this key.
CLIENTS = "clients"


class BoundaryError(RuntimeError):
    """A reply carries something the allowlist does not allow; it is not sent."""


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def histograms_asked(setup: ClientSetup, virtual: bool) -> bool:
    """Whether this client's label histograms may leave it: the run asks for them
    (``output.label_histograms``, off by default; simulation reporting) and, for a device,
    its own node config agrees (``label-histograms=true``), so a server never gets a device's
    case mix on its own say. A virtual client (a simulation) follows the run."""
    if not setup.cfg.output.label_histograms:
        return False
    return virtual or _truthy(setup.node_config.get(NODE_HISTOGRAMS_KEY, False))


def declared_metrics(client_cls: type, setup: ClientSetup) -> dict[str, frozenset[str]]:
    """The method's named metrics per message type (``client_cls.reply_metrics(setup)``)."""
    declare = getattr(client_cls, "reply_metrics", None)
    declared = declare(setup) if declare is not None else {}
    unknown = sorted(set(declared) - set(KINDS))
    if unknown:
        raise BoundaryError(f"{client_cls.__name__} declares metrics for unknown message types {unknown}")
    return {kind: frozenset(declared.get(kind, ())) for kind in KINDS}


@dataclass(frozen=True)
class Allowlist:
    """What one reply may carry: its message type, the method (for errors), the metric names,
    the array names (``train``: the shared split) and which metrics may be lists of how many
    values (``None``: a single number)."""

    kind: str
    method: str
    metrics: frozenset[str]
    arrays: frozenset[str] = frozenset()
    list_lengths: Mapping[str, int] | None = None

    def length(self, key: str) -> int | None:
        """How many values metric ``key`` holds when it is a list (``None``: a single number)."""
        return (self.list_lengths or {}).get(key)


def allowlist(
    kind: str,
    client_cls: type,
    setup: ClientSetup,
    *,
    histograms: bool = False,
    shared: list[str] | None = None,
) -> Allowlist:
    """The allowlist of a ``kind`` reply of one client (``setup``) of ``client_cls``'s method;
    ``histograms``: its label histograms may go (:func:`histograms_asked`); ``shared``: the
    client's shared split (what a ``train`` reply sends)."""
    if kind not in KINDS:
        raise BoundaryError(f"no allowlist for message type '{kind}' (known: {', '.join(KINDS)})")
    metrics = COMMON[kind] | declared_metrics(client_cls, setup)[kind]
    lengths: dict[str, int] = {}
    if kind == QUERY and histograms:
        metrics |= frozenset(HISTOGRAMS)
        lengths = {h: setup.cfg.data.num_classes for h in HISTOGRAMS}
    arrays = frozenset(shared or ()) if kind == TRAIN else frozenset()
    return Allowlist(kind, setup.cfg.method.name, metrics, arrays, lengths)


def batch_allowlist(method: str, per_client: Allowlist | None, num_clients: int) -> Allowlist:
    """A virtual worker's query reply: ``virtual-worker`` and, when it describes ``num_clients``
    clients, ``clients`` and ``per_client``'s keys, each a list with one value per client (a
    histogram: one count per class per client)."""
    if per_client is None or num_clients == 0:
        return Allowlist(QUERY, method, frozenset({VIRTUAL_WORKER}))
    lengths = {k: num_clients * (per_client.length(k) or 1) for k in per_client.metrics}
    lengths[CLIENTS] = num_clients
    return Allowlist(QUERY, method, per_client.metrics | {VIRTUAL_WORKER, CLIENTS}, list_lengths=lengths)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float)


def check_reply(content: RecordDict, allow: Allowlist) -> None:
    """Refuse (:class:`BoundaryError`) a reply that holds a record, an array or a metric outside
    ``allow``, or a metric with more values than allowed."""
    where = f"method '{allow.method}': a {allow.kind} reply"
    fix = "a metric that is meant to leave the client is declared in its client's REPLY_METRICS"
    for name in content:
        if name not in RECORDS[allow.kind]:
            allowed = sorted(RECORDS[allow.kind])
            raise BoundaryError(f"{where} may not carry the record '{name}' (allowed: {allowed})")
    for name, record in content.array_records.items():
        extra = sorted(set(record) - allow.arrays)
        if extra:
            raise BoundaryError(
                f"{where} may not carry the array '{extra[0]}' in '{name}': only the shared split leaves"
                " a client"
            )
    for record in content.metric_records.values():
        for key, value in record.items():
            if key not in allow.metrics:
                raise BoundaryError(f"{where} may not carry the metric '{key}' ({fix})")
            length = allow.length(key)
            if length is None and not _is_number(value):
                kind = type(value).__name__
                raise BoundaryError(f"{where}: metric '{key}' must be a single number, got a {kind}")
            if length is not None and not (isinstance(value, list) and len(value) == length):
                got = len(value) if isinstance(value, list) else type(value).__name__
                raise BoundaryError(f"{where}: metric '{key}' must be a list of {length} numbers, got {got}")
