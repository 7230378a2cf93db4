"""Virtual clients: in simulation a node serves whichever client a message names, so a
federation of N clients runs on W <= N simulated nodes with the same results, and messages are
dealt to the nodes largest first."""

from __future__ import annotations

import json
from pathlib import Path

import fedhelpers
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedvit.config import load_config
from fedvit.inprocess import InProcessGrid
from fedvit.runner import simulation_workers
from fedvit.server_app import run
from strategies.base import PersonalizedStrategy, virtual_address

TINY = "model.depth=1 model.embed_dim=16 model.num_heads=2 train.batch_size=64 train.local_steps=2"


def _federate(tmp_path: Path, name: str, workers: int, node_configs=None):
    rc = {**fedhelpers.run_config(tmp_path, "fedper", TINY, rounds=2), "num-clients": 6, "run-name": name}
    rc["overrides"] += " server.fraction_train=0.5"
    grid = InProcessGrid(rc, workers, node_configs=node_configs)
    run_dir = run(grid, load_config(rc))
    return grid, json.loads((run_dir / "results.json").read_text())


def test_six_clients_on_two_workers_give_the_results_of_six_devices(tmp_path: Path) -> None:
    grid, on_workers = _federate(tmp_path, "workers", workers=2)
    devices = [{"client-id": i} for i in range(6)]  # one node per client, identity from its config
    _, on_devices = _federate(tmp_path, "devices", workers=6, node_configs=devices)
    for a, b in zip(on_workers["rounds"], on_devices["rounds"], strict=True):
        assert a["train"]["per_client"] == b["train"]["per_client"]
        assert a["eval"]["per_client"] == b["eval"]["per_client"]
    assert set(on_workers["clients"]) == {str(c) for c in range(6)}  # described by the workers
    assert on_workers["clients"] == on_devices["clients"]
    # every message went to one of the two workers, each served several clients
    served = {}
    for msg in grid.sent:
        cid = msg.content.config_records.get("config", {}).get("client-id")
        if cid is not None:
            served.setdefault(msg.metadata.dst_node_id, set()).add(int(cid))
    assert len(served) == 2 and all(len(clients) > 1 for clients in served.values())


def test_a_node_with_a_node_config_of_its_own_is_a_device_not_a_worker(tmp_path: Path) -> None:
    states = [{"state-dir": str(tmp_path / f"device-{i}")} for i in range(3)]
    grid, _ = _federate_three(tmp_path, states)
    for msg in grid.sent:
        cid = msg.content.config_records.get("config", {}).get("client-id")
        if cid is not None:  # client i's messages always reach node i (its state-dir lives there)
            assert grid.contexts[msg.metadata.dst_node_id].node_config["partition-id"] == int(cid)


def _federate_three(tmp_path: Path, node_configs):
    rc = fedhelpers.run_config(tmp_path, "fedper", TINY, rounds=2)
    grid = InProcessGrid(rc, 3, node_configs=node_configs)
    return grid, run(grid, load_config(rc))


def test_messages_are_dealt_to_workers_largest_first() -> None:
    strategy = PersonalizedStrategy(shared_shapes={"w": (1,)}, num_clients=4)
    strategy.worker_place = {11: 1, 22: 2}
    sizes = {0: 5, 1: 1, 2: 9, 3: 3}
    for cid, n in sizes.items():
        strategy.node_to_client[virtual_address(cid)] = cid
        strategy.client_info[cid] = {"num_train": n}

    class Grid:
        def get_node_ids(self):
            return [11, 22]

    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"client-id": c})}),
            dst_node_id=virtual_address(c),
            message_type=MessageType.TRAIN,
        )
        for c in sizes
    ]
    addresses = strategy.route(Grid(), messages)
    by_client = {addresses[id(m)]: m.metadata.dst_node_id for m in messages}
    # sorted 9 (client 2), 5 (0), 3 (3), 1 (1), dealt round-robin: the first pass carries 9 and 5
    assert by_client == {
        virtual_address(2): 11,
        virtual_address(0): 22,
        virtual_address(3): 11,
        virtual_address(1): 22,
    }


def test_workers_are_dealt_to_in_the_order_flower_queues_them(tmp_path: Path) -> None:
    class Shuffled(InProcessGrid):  # replies in another order than the nodes were created in
        def send_and_receive(self, messages, *, timeout=None):
            return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))

    rc = {**fedhelpers.run_config(tmp_path, "fedper", TINY, rounds=1), "num-clients": 6}
    grid = Shuffled(rc, 3)
    strategy = PersonalizedStrategy(shared_shapes={"w": (1,)}, num_clients=6)
    strategy.discover(grid, timeout=60)
    # Flower's simulation takes one message per node per pass, nodes in partition-id order
    by_place = sorted(grid.contexts, key=lambda n: grid.contexts[n].node_config["partition-id"])
    assert strategy.workers == by_place


def test_virtual_clients_are_unavailable_without_a_live_worker() -> None:
    strategy = PersonalizedStrategy(shared_shapes={"w": (1,)}, num_clients=2)
    strategy.worker_place = {11: 1}
    strategy.node_to_client = {virtual_address(0): 0, virtual_address(1): 1}

    class Gone:
        def get_node_ids(self):
            return []

    assert strategy._live_nodes(Gone()) == []


@pytest.mark.parametrize(
    ("clients", "cpus_per_client", "cpus", "expected"),
    [(1000, 1, 2, 32), (16, 1, 2, 16), (1000, 1, 16, 128), (1000, 0.5, 16, 256), (5, 1, 64, 5)],
)
def test_a_simulation_starts_a_few_workers_per_running_client_at_most_one_per_client(
    clients: int, cpus_per_client: float, cpus: int, expected: int
) -> None:
    assert simulation_workers(clients, cpus_per_client, cpus) == expected


def test_more_supernodes_than_clients_is_refused(tmp_path: Path) -> None:
    from fedvit.config import ConfigError
    from fedvit.runner import run_flwr

    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match="at most one per client"):
        run_flwr(repo, {"num-clients": 3, "output-dir": str(tmp_path)}, num_supernodes=4, stream=False)
