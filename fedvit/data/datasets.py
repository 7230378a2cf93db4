"""Per-client torch datasets that index into a source's sample store: images are transformed on
the fly (:class:`ImageDataset`), token sequences are served as they are (:class:`TextDataset`).
``data.modality`` picks which."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fedvit.config import FedvitConfig, model_img_size
from fedvit.data.partition import build_partition, client_source, local_client_indices
from fedvit.data.store import DataError, Split

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


class ImageTransform:
    """``uint8 (H, W, C)`` -> normalized ``float32 (in_chans, size, size)``.

    Steps: scale to [0, 1], optionally invert (``data.invert``), replicate grayscale to 3 channels or
    take the luminance of RGB to match ``data.in_chans``, resize (bilinear, antialiased when
    shrinking) to ``size``, then normalize with ``data.mean`` / ``data.std``.
    """

    def __init__(
        self, size: int, mean: list[float], std: list[float], in_chans: int, invert: bool = False
    ) -> None:
        self.size, self.in_chans, self.invert = size, in_chans, invert
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.luma = torch.tensor(_LUMA, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).to(torch.float32).div_(255.0)
        if self.invert:
            x = 1.0 - x
        x = self._match_channels(x)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            shrink = x.shape[-1] > self.size or x.shape[-2] > self.size
            x = F.interpolate(
                x[None], size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink
            )[0]
        return (x - self.mean) / self.std

    def _match_channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[0]
        if c == self.in_chans:
            return x
        if c == 1 and self.in_chans == 3:
            return x.expand(3, -1, -1)
        if c == 3 and self.in_chans == 1:
            return (x * self.luma).sum(0, keepdim=True)
        raise DataError(f"key 'data.in_chans': cannot turn a {c}-channel image into {self.in_chans} channels")


def make_transform(cfg: FedvitConfig) -> ImageTransform:
    """The transform for ``cfg`` (model image size, ``data.mean`` / ``std`` / ``in_chans`` / ``invert``)."""
    d = cfg.data
    return ImageTransform(model_img_size(cfg), list(d.mean), list(d.std), d.in_chans, d.invert)


class ImageDataset(Dataset):
    """``(image tensor, int label)`` for ``indices`` of one split; O(1) per item, no pixel copies."""

    def __init__(self, split: Split, indices: np.ndarray, transform: ImageTransform) -> None:
        self.split, self.indices, self.transform = split, np.asarray(indices, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return self.transform(self.split.images[j]), int(self.split.labels[j])

    @property
    def labels(self) -> np.ndarray:
        return self.split.labels[self.indices]


class TextDataset(Dataset):
    """``(int64 token tensor (L,), int label)`` for ``indices`` of one split of token sequences."""

    def __init__(self, split: Split, indices: np.ndarray) -> None:
        self.split, self.indices = split, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = int(self.indices[i])
        return torch.from_numpy(np.array(self.split.images[j], dtype=np.int64)), int(self.split.labels[j])

    @property
    def labels(self) -> np.ndarray:
        return self.split.labels[self.indices]


ClientDataset = ImageDataset | TextDataset


def dataset_factory(cfg: FedvitConfig) -> Callable[[Split, np.ndarray], ClientDataset]:
    """``(split, indices) -> dataset`` for ``data.modality``: images (transformed) or text."""
    if cfg.data.modality == "text":
        return TextDataset
    if cfg.data.modality != "image":
        raise DataError(f"key 'data.modality': must be 'image' or 'text', got '{cfg.data.modality}'")
    tf = make_transform(cfg)
    return lambda split, indices: ImageDataset(split, indices, tf)


@dataclass
class ClientDatasets:
    """One client's train / val / test datasets."""

    client_id: int
    train: ClientDataset
    val: ClientDataset
    test: ClientDataset
    num_classes: int
    class_names: list[str] | None = None
    natural_id: str | None = None  # e.g. the FEMNIST writer of a natural partition

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    @property
    def label_histograms(self) -> dict[str, np.ndarray]:
        """Per split, the number of examples of each class (length ``num_classes``)."""
        return {
            name: np.bincount(ds.labels, minlength=self.num_classes).astype(np.int64)
            for name, ds in (("train", self.train), ("val", self.val), ("test", self.test))
        }


def load_client_datasets(
    cfg: FedvitConfig, client_id: int, *, data_path: str | None = None
) -> ClientDatasets:
    """Client ``client_id``'s datasets.

    Without ``data_path`` the client's share of the federation-wide partition (see
    :mod:`fedvit.data.partition`). With ``data_path`` (a device's node-config ``data-path``) the whole
    source at that path is this client's data: its train split gives train and val, its test split
    (or a seeded hold-out of ``data.test_fraction``) gives test; by the pooled protocol
    (``data.partition.pool``) its pooled splits are cut as one client's share is.
    """
    if isinstance(client_id, bool) or not isinstance(client_id, int | np.integer) or client_id < 0:
        raise DataError(f"client id must be an integer >= 0, got {client_id!r}")
    client_id = int(client_id)
    if data_path:
        source = client_source(cfg, data_path)
        idx = local_client_indices(cfg, source, client_id)
    else:
        idx = build_partition(cfg).client(client_id)
        source = client_source(cfg)
    assert source.test is not None
    make = dataset_factory(cfg)
    return ClientDatasets(
        client_id,
        make(source.train, idx.train),
        make(source.train, idx.val),
        make(source.test, idx.test),
        cfg.data.num_classes,
        source.class_names,
        idx.natural_id,
    )
