"""In-memory sample stores and labelled splits (the one store abstraction every source uses).

A :class:`SampleStore` serves samples by position. An :class:`ImageStore` serves images as
``uint8`` arrays of shape ``(H, W, C)`` at their native size. It holds either one dense array (npz
sources, sklearn digits) or a list of encoded image bytes (parquet / Hugging Face ``Image``
columns) that are decoded on first access and memoized, so an epoch never re-decodes an image and
a client only decodes its own images. A :class:`TokenStore` serves token sequences (text sources)
as ``int64`` arrays of shape ``(L,)``.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from fedvit.errors import ConfigError


class DataError(ConfigError):
    """A data problem (missing file, impossible partition ...), with the config key in the message."""


class SampleStore:
    """Random access to samples (images or token sequences) as numpy arrays; O(1) per item."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def take(self, indices: np.ndarray) -> SampleStore:
        """A view of the samples at ``indices`` (no copy)."""
        return IndexedStore(self, np.asarray(indices, dtype=np.int64))


class ImageStore(SampleStore):
    """Random access to images as ``uint8`` arrays ``(H, W, C)``; O(1) per item."""


class TokenStore(SampleStore):
    """A dense ``int64`` array ``(N, L)`` of token sequences (e.g. character indices)."""

    def __init__(self, tokens: np.ndarray) -> None:
        if tokens.dtype != np.int64 or tokens.ndim != 2:
            raise DataError(
                f"token sequences must be int64 of shape (N, L), got {tokens.dtype} {tokens.shape}"
            )
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[i]

    @property
    def seq_len(self) -> int:
        """Tokens per sequence."""
        return int(self.tokens.shape[1])


class ArrayStore(ImageStore):
    """A dense ``uint8`` array ``(N, H, W)`` or ``(N, H, W, C)``."""

    def __init__(self, images: np.ndarray) -> None:
        if images.dtype != np.uint8:
            raise DataError(f"images must be uint8, got {images.dtype}")
        if images.ndim == 3:
            images = images[..., None]  # a view: grayscale gets a channel axis
        if images.ndim != 4:
            raise DataError(f"images must have shape (N, H, W[, C]), got {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.images[i]


def decode_image(blob: bytes) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to ``uint8 (H, W, C)``; grayscale stays 1 channel."""
    with Image.open(io.BytesIO(blob)) as img:
        if img.mode not in ("L", "RGB"):
            img = img.convert("L" if img.mode in ("1", "I", "I;16", "F") else "RGB")
        arr = np.array(img, dtype=np.uint8)  # writable: torch.from_numpy needs it
    return arr[..., None] if arr.ndim == 2 else arr


class EncodedStore(ImageStore):
    """Encoded image bytes, decoded on first access and memoized (per process)."""

    def __init__(self, blobs: list[bytes]) -> None:
        self.blobs = blobs
        self._decoded: list[np.ndarray | None] = [None] * len(blobs)

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> np.ndarray:
        img = self._decoded[i]
        if img is None:
            img = self._decoded[i] = decode_image(self.blobs[i])
        return img


class IndexedStore(SampleStore):
    """A subset of another store (e.g. a held-out test split)."""

    def __init__(self, base: SampleStore, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.base[int(self.indices[i])]


class ConcatStore(SampleStore):
    """Several stores end to end (pooled splits); no copy, each part keeps its own memo."""

    def __init__(self, parts: list[SampleStore]) -> None:
        self.parts = parts
        self.starts = [0]  # a list: bisect on it is ~20x faster per item than np.searchsorted
        for part in parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        j = bisect.bisect_right(self.starts, i) - 1
        return self.parts[j][i - self.starts[j]]


@dataclass
class Split:
    """One split of a source: samples (``images``: images or token sequences), ``int64`` labels and
    optional natural ids (e.g. writers, speakers)."""

    images: SampleStore
    labels: np.ndarray
    ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels).reshape(-1).astype(np.int64)
        if len(self.labels) != len(self.images):
            raise DataError(f"{len(self.images)} samples but {len(self.labels)} labels")
        if self.ids is not None:
            self.ids = np.asarray(self.ids).reshape(-1)
            if len(self.ids) != len(self.labels):
                raise DataError(f"{len(self.labels)} labels but {len(self.ids)} natural ids")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Split:
        """The examples at ``indices`` (samples as a view)."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = None if self.ids is None else self.ids[indices]
        return Split(self.images.take(indices), self.labels[indices], ids)


@dataclass
class SourceData:
    """A loaded dataset: its train split and, when the source has one, its test split."""

    name: str
    train: Split
    test: Split | None = None
    class_names: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # where it came from (for messages, cache keys)
    test_held_out: bool = False  # True: ``test`` was carved from the source's train split
    val: Split | None = None  # the official validation split, if any (used only when pooling)
