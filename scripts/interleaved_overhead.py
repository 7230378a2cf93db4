"""Per-client cost of the ClientApp against the plain compute of the same images, in one process.

Alternates a real ``train`` / ``evaluate`` message through ``fedvit.client_app.app`` (in-process,
1 thread) with a plain timm loop over as many random images (train: SGD steps at the train batch
size; evaluate: forward passes at the eval batch size), so both see the same machine state. Used
for docs/experiments.md ("Why the 16-client round is still 1.4x its bound").

usage: python scripts/interleaved_overhead.py [CLIENT_ID] [REPEATS]   (OrganAMNIST in ../shared/data)
"""

import sys
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedvit import client_app
from fedvit.config import load_config
from fedvit.data import load_client_datasets
from fedvit.inprocess import InProcessGrid
from fedvit.models import build_model
from fedvit.params import ParameterSplit, get_arrays
from fedvit.training import make_optimizer
from fedvit.wire import to_record

torch.set_num_threads(1)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RC = {
    "experiment": "organamnist-baselines",
    "method": "fedavg",
    "data-dir": str(DATA),
    "num-clients": 16,
    "overrides": "model.patch_size=4 train.optimizer=sgd train.lr=0.05 train.grad_clip=null",
}


def main() -> None:
    cid = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    InProcessGrid({}, 0)  # messages made in this process need a ServerApp's identity
    cfg = load_config(RC)
    model = build_model(cfg)
    arrays = to_record(get_arrays(model, ParameterSplit.from_model(model, cfg.method.private).shared))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config=RC)

    def message(kind: str) -> Message:
        config = ConfigRecord({"client-id": cid, "server-round": 1, "run-name": "x", "run-key": "x-1"})
        return Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=1, message_type=kind)

    data = load_client_datasets(cfg, cid)
    c = cfg.data.in_chans
    size = cfg.model.img_size
    client_app.app(message(MessageType.EVALUATE), ctx)  # warm: model pool, datasets
    ref, trainee = build_model(cfg).eval(), build_model(cfg).train()
    opt = make_optimizer(list(trainee.parameters()), cfg.train)

    def batches(n: int, bs: int) -> list[int]:
        return [bs] * (n // bs) + ([n % bs] if n % bs else [])

    for _ in range(repeats):
        t = time.perf_counter()
        client_app.app(message(MessageType.EVALUATE), ctx)
        t_eval_msg = time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            for split in (data.test, data.val):
                for bs in batches(len(split), cfg.train.eval_batch_size):
                    ref(torch.randn(bs, c, size, size))
        t_eval = time.perf_counter() - t
        t = time.perf_counter()
        client_app.app(message(MessageType.TRAIN), ctx)
        t_train_msg = time.perf_counter() - t
        t = time.perf_counter()
        for bs in batches(len(data.train), cfg.train.batch_size):
            x, y = torch.randn(bs, c, size, size), torch.randint(0, cfg.data.num_classes, (bs,))
            loss = torch.nn.functional.cross_entropy(trainee(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t_train = time.perf_counter() - t
        print(
            f"evaluate message {t_eval_msg:.3f}s vs plain {t_eval:.3f}s ({t_eval_msg / t_eval:.3f}x) | "
            f"train message {t_train_msg:.3f}s vs plain {t_train:.3f}s ({t_train_msg / t_train:.3f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
