#!/usr/bin/env python3
"""Predict with a model written by ``fedvit export`` — needs torch and numpy only.

    python scripts/predict.py MODEL.pt2 IMAGES.npy [--top 3]
    python scripts/predict.py MODEL.pt2 img1.png img2.jpg      (image files need Pillow)

``IMAGES.npy``: uint8 images, ``(N, H, W)`` or ``(N, H, W, C)``; text models take ``(N, L)``
int64 character indices. Prints one line per input: the predicted class (and its name when the
export has class names) with its probability.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)


def load(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The exported model (a ``torch.export`` program, already in inference mode) and its
    ``fedvit.json`` metadata."""
    extra = {"fedvit.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra["fedvit.json"])


def preprocess(images: np.ndarray, spec: dict) -> torch.Tensor:
    """uint8 ``(N, H, W[, C])`` images -> the model's normalized ``(N, C, S, S)`` float input."""
    if images.ndim == 3:
        images = images[..., None]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    if spec["invert"]:
        x = 1.0 - x
    c, want = x.shape[1], spec["in_chans"]
    if c == 1 and want == 3:
        x = x.expand(-1, 3, -1, -1)
    elif c == 3 and want == 1:
        x = (x * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif c != want:
        raise ValueError(f"cannot turn {c}-channel images into {want} channels")
    size = spec["size"]
    if tuple(x.shape[-2:]) != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


def predict(model: torch.nn.Module, meta: dict, inputs: np.ndarray, batch: int = 256) -> np.ndarray:
    """Class probabilities ``(N, num_classes)`` for raw ``inputs``."""
    spec = meta["preprocess"]
    out = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            chunk = inputs[i : i + batch]
            if spec["modality"] == "text":
                x = torch.from_numpy(np.asarray(chunk, dtype=np.int64))
            else:
                x = preprocess(np.asarray(chunk, dtype=np.uint8), spec)
            out.append(torch.softmax(model(x), dim=-1).numpy())
    return np.concatenate(out) if out else np.zeros((0, meta["num_classes"]), dtype=np.float32)


def _read_inputs(paths: list[str]) -> np.ndarray:
    if len(paths) == 1 and paths[0].endswith(".npy"):
        return np.load(paths[0], allow_pickle=False)
    from PIL import Image

    return np.stack([np.asarray(Image.open(p)) for p in paths])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="file written by `fedvit export`")
    p.add_argument("inputs", nargs="+", help="one .npy array, or image files")
    p.add_argument("--top", type=int, default=1, help="print the top-k classes")
    args = p.parse_args(argv)
    model, meta = load(args.model)
    probs = predict(model, meta, _read_inputs(args.inputs))
    names = meta.get("class_names")
    for i, row in enumerate(probs):
        best = np.argsort(-row)[: args.top]
        shown = ", ".join(f"{k}{f' ({names[k]})' if names else ''}: {row[k]:.3f}" for k in best)
        print(f"{i}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
