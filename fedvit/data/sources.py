"""Dataset sources: every ``data.source`` becomes one :class:`SourceData` (native-size images).

Sources (``data.source``):

``sklearn-digits``  scikit-learn's bundled 8x8 digits (0..16 scaled to 0..255); no test split.
``parquet``         a local Hugging Face-style parquet folder (``train-*.parquet``, ``test-*.parquet``,
                    also ``data/train-*.parquet`` or ``train/*.parquet``), a single ``.parquet`` file
                    (train only), or a ``Dataset(Dict).save_to_disk`` folder.
``medmnist-npz``    the official MedMNIST npz. Official ``train`` is the train split, ``test`` the test
                    split; the official ``val`` split is **not used** (each client's validation set is
                    carved from its own training partition instead), so split sizes stay official,
                    except by the pooled protocol (``data.partition.pool``), which pools all three.
``femnist-npz``     ``x_*`` / ``y_*`` / optional ``u_*`` (writer ids) npz, e.g. the LEAF FEMNIST subset
                    (also fits ``cifar100_subset.npz``).
``hub``             ``datasets.load_dataset(data.hub_id, data.hub_config)``: ``train`` and (if present)
                    ``test`` (and ``validation`` / ``val`` / ``valid``, used only by the pooled protocol).
                    With a node-config ``data-path`` the same schema is read from local files.
``leaf-shakespeare`` (text) ``{"train": LEAF-json, "test": LEAF-json}``, gzipped or not: token sequences
                    of LEAF's 80-character vocabulary, speakers as natural ids (:mod:`fedvit.data.text`).

A local source whose file is missing falls back to the hub when ``data.hub_id`` is set (e.g.
``cifar10`` -> ``uoft-cs/cifar10``); without ``data.hub_id`` it raises one :class:`DataError`.

Loaded sources are cached per process (keyed by path, file sizes and mtimes), so a process that
serves many simulated clients reads and decodes a dataset once.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fedvit.config import CONF_DIR, DataConfig
from fedvit.data.store import ArrayStore, DataError, EncodedStore, ImageStore, SourceData, Split, TokenStore
from fedvit.data.text import load_leaf_shakespeare

SPLIT_NAMES = ("train", "test")
VAL_NAMES = ("validation", "val", "valid")  # an official validation split (pooled protocol only)


# --------------------------------------------------------------------------- paths


def _path_hint(cfg: DataConfig) -> str:
    return (
        f"data.path='{cfg.path}' is relative to data.data_dir='{cfg.data_dir}' (run-config key "
        f"'data-dir'), e.g. --run-config \"data-dir='../shared/data'\""
    )


def resolve_path(cfg: DataConfig, path_override: str | None = None) -> Path | None:
    """The local file or folder a source reads, or ``None`` for sources without one.

    ``path_override`` (a device's node-config ``data-path``) wins over ``data.path``; a relative
    ``data.path`` is looked up under ``data.data_dir`` (relative to the working directory, then to
    the project root). A missing path raises one :class:`DataError` naming the key.
    """
    if path_override:
        if cfg.source == "sklearn-digits":
            raise DataError(
                "node-config 'data-path' is set, but data.source 'sklearn-digits' reads no local files; "
                "drop data-path or use a file-based data.source"
            )
        path = Path(path_override).expanduser()
        if not path.exists():
            raise DataError(f"node-config 'data-path': no such file or folder: {path.resolve()}")
        return path.resolve()
    if cfg.source == "sklearn-digits" or (cfg.source == "hub" and not cfg.path):
        return None
    if not cfg.path:
        raise DataError(f"key 'data.path': required when data.source is '{cfg.source}'")
    path = Path(cfg.path).expanduser()
    if path.is_absolute():
        if not path.exists():
            raise DataError(f"key 'data.path': no such file or folder: {path}")
        return path
    data_dir = Path(cfg.data_dir).expanduser()
    candidates = [data_dir / path]
    if not data_dir.is_absolute() and (CONF_DIR.parent / data_dir).resolve() != data_dir.resolve():
        candidates.append(CONF_DIR.parent / data_dir / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    tried = ", ".join(str(c.resolve()) for c in candidates)
    raise DataError(
        f"key 'data.path' / 'data.data_dir': no such file or folder (tried {tried}); {_path_hint(cfg)}"
    )


def _identity(path: Path) -> tuple[tuple[str, int, int], ...]:
    """(file, size, mtime) of the data files under ``path``: what a cache key needs."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def _plan(cfg: DataConfig, path_override: str | None) -> tuple[str, Path | None, str]:
    """(source to load, local path or ``None``, why the hub is used instead of a local copy).

    A local source whose file is missing falls back to the hub when ``data.hub_id`` is set.
    """
    try:
        return cfg.source, resolve_path(cfg, path_override), ""
    except DataError as err:
        if path_override or cfg.source == "hub" or not cfg.hub_id:
            raise
        return "hub", None, str(err)


def source_identity(cfg: DataConfig, path_override: str | None = None) -> dict[str, Any]:
    """What identifies the loaded data: source, resolved path and its files' sizes (for cache keys)."""
    source, path, _ = _plan(cfg, path_override)
    ident: dict[str, Any] = {"source": source, "path": None if path is None else str(path)}
    if path is not None:
        ident["files"] = [(name, size) for name, size, _ in _identity(path)]
    else:
        ident["hub"] = [cfg.hub_id, cfg.hub_config] if source == "hub" else None
    if source in ("parquet", "hub"):
        ident["keys"] = [cfg.image_key, cfg.label_key, cfg.partition.id_key]
    return ident


# --------------------------------------------------------------------------- entry point


def load_source(cfg: DataConfig, path_override: str | None = None) -> SourceData:
    """Load the source named by ``cfg.source`` (cached per process).

    ``path_override`` is a device's own copy (node-config ``data-path``) in the source's format.
    """
    source, path, fallback = _plan(cfg, path_override)
    stamp = _identity(path) if path is not None else ()
    keys = (cfg.image_key, cfg.label_key, cfg.partition.id_key)
    hub = (cfg.hub_id, cfg.hub_config, fallback)
    data = _load_cached(source, None if path is None else str(path), stamp, keys, hub)
    for name, split in (("train", data.train), ("test", data.test)):
        store = None if split is None or len(split) == 0 else split.images
        if isinstance(store, TokenStore) and store.seq_len != cfg.seq_len:
            raise DataError(
                f"key 'data.seq_len': the {name} sequences of {path} have {store.seq_len} tokens, "
                f"but data.seq_len is {cfg.seq_len}"
            )
    return SourceData(cfg.name, data.train, data.test, data.class_names, dict(data.info), val=data.val)


def clear_caches() -> None:
    """Forget every source loaded in this process."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_cached(
    source: str,
    path: str | None,
    stamp: tuple[Any, ...],
    keys: tuple[str, str, str],
    hub: tuple[str | None, str | None, str],
) -> SourceData:
    del stamp  # only part of the cache key: a rewritten file is reloaded
    image_key, label_key, id_key = keys
    p = Path(path) if path is not None else None
    if source == "sklearn-digits":
        data = _load_digits()
    elif source == "medmnist-npz":
        data = _load_npz(p, "{split}_images", "{split}_labels", None)
    elif source == "femnist-npz":
        data = _load_npz(p, "x_{split}", "y_{split}", "u_{split}")
    elif source == "parquet" or (source == "hub" and p is not None):
        data = _load_local_hf(p, image_key, label_key, id_key)
    elif source == "hub":
        data = _load_hub(*hub, image_key, label_key, id_key)
    elif source == "leaf-shakespeare":
        data = load_leaf_shakespeare(p)
    else:
        raise DataError(f"key 'data.source': unknown source '{source}'")
    data.info.update({"source": source, "path": path})
    return data


# --------------------------------------------------------------------------- array sources


def _load_digits() -> SourceData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    names = [str(n) for n in digits.target_names]
    return SourceData("digits", Split(ArrayStore(images), digits.target), None, names)


def _load_npz(path: Path | None, images_key: str, labels_key: str, ids_key: str | None) -> SourceData:
    """An npz with ``<split>`` keys, e.g. MedMNIST (``train_images``) or LEAF (``x_train``)."""
    assert path is not None
    if not path.is_file():
        raise DataError(f"key 'data.path': {path} is not an npz file")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:
        raise DataError(f"key 'data.path': cannot read {path} as npz: {err}") from err
    with npz:
        splits: dict[str, Split] = {}
        for split in (*SPLIT_NAMES, "val"):
            ik, lk = images_key.format(split=split), labels_key.format(split=split)
            if ik not in npz.files or lk not in npz.files:
                if split == "train":
                    raise DataError(
                        f"key 'data.path': {path} has no '{ik}' / '{lk}' arrays (found {sorted(npz.files)}); "
                        "is data.source right?"
                    )
                continue
            labels = npz[lk]
            if labels.ndim == 2 and labels.shape[1] != 1:
                raise DataError(
                    f"key 'data.path': {path} holds multi-label targets {labels.shape}; not supported"
                )
            ids = (
                npz[ids_key.format(split=split)]
                if ids_key and ids_key.format(split=split) in npz.files
                else None
            )
            splits[split] = Split(ArrayStore(npz[ik]), labels, ids)
        names = [str(c) for c in npz["classes"]] if "classes" in npz.files else None
    return SourceData(path.stem, splits["train"], splits.get("test"), names, val=splits.get("val"))


# --------------------------------------------------------------------------- Hugging Face sources


def _load_hub(
    hub_id: str | None, hub_config: str | None, fallback: str, image_key: str, label_key: str, id_key: str
) -> SourceData:
    """``datasets.load_dataset(hub_id, hub_config)``: its ``train`` and ``test`` splits.

    ``fallback`` is non-empty when a local copy was configured but missing (then both are reported).
    """
    import datasets

    if not hub_id:
        raise DataError("key 'data.hub_id': required when data.source is 'hub'")
    try:
        dd = datasets.load_dataset(hub_id, hub_config)
    except Exception as err:
        local = f"{fallback}; the hub fallback failed too: " if fallback else ""
        raise DataError(
            f"{local}key 'data.hub_id': cannot load '{hub_id}' (config {hub_config!r}) from the Hugging Face "
            f"hub: {err}. Offline? Put the files in a local folder (data.source 'parquet', data.path) or "
            "pass the node-config 'data-path'."
        ) from err
    return _from_dataset_dict(dd, hub_id, image_key, label_key, id_key)


def _from_dataset_dict(dd: Any, where: str, image_key: str, label_key: str, id_key: str) -> SourceData:
    if "train" not in dd:
        raise DataError(f"key 'data.hub_id': '{where}' has no 'train' split (splits: {list(dd)})")
    splits = {
        name: _split_from_table(dd[name].with_format("arrow")[:], image_key, label_key, id_key, where)
        for name in SPLIT_NAMES
        if name in dd
    }
    val_name = next((name for name in VAL_NAMES if name in dd), None)
    if val_name is not None:
        table = dd[val_name].with_format("arrow")[:]
        splits["val"] = _split_from_table(table, image_key, label_key, id_key, where)
    names = _class_names(dd["train"].features, label_key)
    return SourceData(where, splits["train"], splits.get("test"), names, val=splits.get("val"))


def _load_local_hf(path: Path | None, image_key: str, label_key: str, id_key: str) -> SourceData:
    """A local parquet folder / file, or a ``save_to_disk`` folder, with the hub's schema."""
    assert path is not None
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        import datasets

        loaded = datasets.load_from_disk(str(path))
        dd = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return _from_dataset_dict(dd, str(path), image_key, label_key, id_key)
    files = _parquet_files(path)
    splits: dict[str, Split] = {}
    names = None
    for split, paths in files.items():
        table = pa.concat_tables([pq.read_table(p) for p in paths])
        splits[split] = _split_from_table(table, image_key, label_key, id_key, str(path))
        if names is None:
            names = _class_names(_features_of(table.schema), label_key)
    return SourceData(path.stem, splits["train"], splits.get("test"), names, val=splits.get("val"))


def _parquet_files(path: Path) -> dict[str, list[Path]]:
    """``{"train": [...], "test": [...], "val": [...]}`` from file or folder names (``validation``,
    ``val`` or ``valid`` give ``val``, which only the pooled protocol uses)."""
    if path.is_file():
        return {"train": [path]}
    found = sorted(path.rglob("*.parquet"))
    if not found:
        raise DataError(f"key 'data.path': no .parquet files in {path}")
    files: dict[str, list[Path]] = {}
    for p in found:
        tags = [p.stem.split("-")[0].split("_")[0], *(part for part in p.relative_to(path).parts[:-1])]
        split = next((s for s in SPLIT_NAMES if s in tags), None) or (
            "val" if any(t in VAL_NAMES for t in tags) else None
        )
        if split is not None:
            files.setdefault(split, []).append(p)
    if "train" not in files:
        if any(t in p.stem for p in found for t in ("val", "test")):
            raise DataError(
                f"key 'data.path': no train-*.parquet in {path} (found {[p.name for p in found]})"
            )
        files = {"train": found}  # no split names at all: everything is training data
    return files


def _features_of(schema: pa.Schema) -> Any:
    import datasets

    try:
        return datasets.Features.from_arrow_schema(schema)
    except Exception:  # not written by `datasets`: no class names
        return {}


def _class_names(features: Any, label_key: str) -> list[str] | None:
    feature = features.get(label_key) if hasattr(features, "get") else None
    names = getattr(feature, "names", None)
    return [str(n) for n in names] if names else None


def _split_from_table(table: pa.Table, image_key: str, label_key: str, id_key: str, where: str) -> Split:
    """One split from an Arrow table with the hub's schema (an ``Image`` column and a label column)."""
    for key, name in ((image_key, "data.image_key"), (label_key, "data.label_key")):
        if key not in table.column_names:
            raise DataError(f"key '{name}': no column '{key}' in {where} (columns: {table.column_names})")
    labels = table.column(label_key).to_numpy()
    if labels.dtype.kind not in "iu":
        raise DataError(
            f"key 'data.label_key': column '{label_key}' in {where} is not an integer class label"
        )
    ids = table.column(id_key).to_numpy(zero_copy_only=False) if id_key in table.column_names else None
    return Split(_image_store(table.column(image_key), where), labels, ids)


def _image_store(column: pa.ChunkedArray, where: str) -> ImageStore:
    """An ``Image`` struct column (bytes, path) or raw bytes -> lazy decoding; nested lists -> an array."""
    kind = column.type
    if pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0:
        blobs = column.combine_chunks().field("bytes").to_pylist()
        if any(b is None for b in blobs):
            paths = column.combine_chunks().field("path").to_pylist()
            blobs = [b if b is not None else _read_bytes(p, where) for b, p in zip(blobs, paths, strict=True)]
        return EncodedStore(blobs)
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return EncodedStore(column.to_pylist())
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        return ArrayStore(np.asarray(column.to_pylist(), dtype=np.uint8))
    raise DataError(f"key 'data.image_key': column of type {kind} in {where} is not an image column")


def _read_bytes(path: str | None, where: str) -> bytes:
    if not path or not Path(path).is_file():
        raise DataError(
            f"key 'data.image_key': an image in {where} has neither bytes nor a readable path ({path})"
        )
    return Path(path).read_bytes()
