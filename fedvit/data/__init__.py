"""fedvit's data layer: sources, federated partitions, per-client datasets and summaries.

load_source(cfg.data)              -> SourceData (native-size uint8 images or int64 token sequences,
                                      int64 labels, ids)
build_partition(cfg)               -> Partition (per-client train / val / test indices, cached)
client_source(cfg)                 -> SourceData the indices point into (pooled splits by data.partition.pool)
load_client_datasets(cfg, cid)     -> ClientDatasets (torch datasets: images resized + normalized on the
                                      fly, or token sequences for data.modality 'text')
summarize_partition(cfg)           -> list of per-client dicts; format_partition_table(...) -> rich Table
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule defining it. Imported on first use (PEP 562), so that importing one
# light submodule (``fedvit.data.text``'s vocabulary, ``fedvit.data.store``) does not import torch.
_EXPORTS = {
    "datasets": (
        "ClientDatasets",
        "ImageDataset",
        "ImageTransform",
        "TextDataset",
        "dataset_factory",
        "load_client_datasets",
        "make_transform",
    ),
    "partition": (
        "ClientIndices",
        "Partition",
        "build_partition",
        "cache_path",
        "clear_memory_cache",
        "client_source",
        "describe_protocol",
        "partition_fingerprint",
        "prepared_source",
        "with_test_split",
    ),
    "sources": ("clear_caches", "load_source", "resolve_path"),
    "store": ("DataError", "ImageStore", "SampleStore", "SourceData", "Split", "TokenStore"),
    "summary": ("format_partition_table", "summarize_partition"),
}
_WHERE = {name: module for module, exported in _EXPORTS.items() for name in exported}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedvit.data' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"fedvit.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


def clear_all_caches() -> None:
    """Forget loaded sources and partitions of this process (the disk cache stays)."""
    from fedvit.data.partition import clear_memory_cache
    from fedvit.data.sources import clear_caches

    clear_caches()
    clear_memory_cache()


__all__ = [
    "ClientDatasets",
    "ClientIndices",
    "DataError",
    "ImageDataset",
    "ImageStore",
    "ImageTransform",
    "Partition",
    "SampleStore",
    "SourceData",
    "Split",
    "TextDataset",
    "TokenStore",
    "build_partition",
    "cache_path",
    "clear_all_caches",
    "clear_caches",
    "clear_memory_cache",
    "client_source",
    "dataset_factory",
    "describe_protocol",
    "format_partition_table",
    "load_client_datasets",
    "load_source",
    "make_transform",
    "partition_fingerprint",
    "prepared_source",
    "resolve_path",
    "summarize_partition",
    "with_test_split",
]
