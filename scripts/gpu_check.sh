#!/usr/bin/env bash
# The GPU check: what only a CUDA machine can show. Run from the repository root on a machine with
# a GPU and PyTorch (CI has none, so these tests skip there):
#
#   scripts/gpu_check.sh [WHEEL_DIR] [OUT_DIR]
#
# WHEEL_DIR (optional): wheels of what that machine's Python lacks (flwr, omegaconf, ... for an image
# that has torch but not Flower; installed --no-deps, nothing fetched). OUT_DIR (default: gpu-check/)
# receives the pytest log, its JUnit XML and gpu-timing.json (train-step seconds on the GPU).
# GPU_CHECK_INSTALL_ONLY=1: install the wheels and stop (to run something else on that machine).
set -uo pipefail
WHEELS=${1:-}
OUT=${2:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
PY=${PYTHON:-python3}

if [[ -n "$WHEELS" ]]; then
  missing=()
  for spec in flwr:flwr omegaconf:omegaconf flwr_datasets:flwr_datasets datasets:datasets dill:dill \
      multiprocess:multiprocess iterators:iterators tomli:tomli tomli_w:tomli_w Crypto:pycryptodome \
      cryptography:cryptography cffi:cffi pycparser:pycparser grpc_health:grpcio_health_checking \
      prompt_toolkit:prompt_toolkit sqlalchemy:sqlalchemy greenlet:greenlet alembic:alembic mako:mako \
      fastapi:fastapi starlette:starlette pydantic:pydantic pydantic_core:pydantic_core \
      annotated_types:annotated_types typing_inspection:typing_inspection annotated_doc:annotated_doc; do
    module=${spec%%:*} dist=${spec##*:}
    "$PY" -c "import $module" 2>/dev/null || missing+=("$WHEELS/${dist}-"*.whl)
  done
  # Flower needs protobuf >= 5.28.
  "$PY" -c "import google.protobuf as p, sys; sys.exit(tuple(map(int, p.__version__.split('.')[:2])) < (5, 28))" \
    2>/dev/null || missing+=("$WHEELS/protobuf-"*.whl)
  if ((${#missing[@]})); then
    "$PY" -m pip install -q --no-index --no-deps "${missing[@]}" || exit 1
  fi
fi

[[ -n "${GPU_CHECK_INSTALL_ONLY:-}" ]] && exit 0

nvidia-smi -L
"$PY" -c "import torch, flwr; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.get_device_name(0), 'flwr', flwr.__version__)" || exit 1

# 1. The CUDA specification, then the suites whose clients pick CUDA themselves (device 'auto').
"$PY" -m pytest -q -p no:cacheprovider -n "${GPU_CHECK_WORKERS:-8}" --timeout 300 \
  --junitxml "$OUT/junit.xml" \
  tests/test_cuda.py tests/test_models_training.py tests/test_pretrain.py tests/test_federation.py \
  tests/test_methods_*.py tests/test_state.py tests/test_export.py 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}

# 2. Train-step time on this GPU (tiny-ViT CIFAR shape): fp32 and bf16 autocast, batch 64 and 256.
"$PY" - "$OUT/gpu-timing.json" <<'EOF'
import json, sys, time
import torch
from fedvit.config import load_config
from fedvit.models import build_model
from fedvit.training import _autocast

out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "steps": {}}
cfg = load_config({"dataset": "cifar10"})
dev = torch.device("cuda")
for amp in (False, True):
    for batch in (64, 256):
        model = build_model(cfg).to(dev).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, cfg.data.image_size, cfg.data.image_size, device=dev)
        y = torch.randint(0, 10, (batch,), device=dev)
        autocast, _ = _autocast(dev, amp)
        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            step()
        torch.cuda.synchronize()
        s = (time.perf_counter() - t) / 50
        out["steps"][f"{'bf16' if amp else 'fp32'}-b{batch}"] = {"s_per_step": s, "images_per_s": batch / s}
out["model"] = {k: getattr(cfg.model, k) for k in ("name", "embed_dim", "depth", "num_heads", "patch_size")
                if hasattr(cfg.model, k)}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out, indent=1))
EOF
exit "$status"
