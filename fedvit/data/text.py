"""Text sources: LEAF Shakespeare (next-character prediction) and LEAF's character vocabulary.

``leaf-shakespeare`` reads one json file (optionally gzip-compressed, by its ``.gz`` suffix)
holding ``{"train": LEAF-json, "test": LEAF-json}``; a LEAF-json has ``users`` and
``user_data[user] = {"x": [strings of data.seq_len characters], "y": [the next character]}``.
The ``x`` / ``y`` lists are the samples (LEAF's ``num_samples`` is not trusted: in LEAF's
Shakespeare test files it over-counts). Each sample becomes ``x``: ``int64 (seq_len,)`` character
indices, label: the index of ``y``, natural id: its user (one client per user in a ``natural``
partition; a client's test split is its own user's LEAF test data).

Characters are mapped with LEAF's standard 80-character vocabulary :data:`ALL_LETTERS`. A
character outside it maps to :data:`UNKNOWN_INDEX` = 79 (``'}'``, the last index): what LEAF's
own ``letter_to_vec`` yields, since ``str.find`` returns -1 and ``vec[-1]`` is the last slot.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedvit.data.store import DataError, SourceData, Split, TokenStore

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
VOCAB_SIZE = len(ALL_LETTERS)  # 80
UNKNOWN_INDEX = VOCAB_SIZE - 1  # '}': LEAF's letter_to_vec puts find() == -1 in the last slot
CLASS_NAMES = [repr(ch) for ch in ALL_LETTERS]  # "'a'", "'\\n'", "' '": readable in tables
_ASCII = np.full(128, UNKNOWN_INDEX, dtype=np.int64)  # code point -> index (every letter is ASCII)
_ASCII[[ord(ch) for ch in ALL_LETTERS]] = np.arange(VOCAB_SIZE)


def encode(text: str) -> np.ndarray:
    """Character indices of ``text`` (``int64``); unknown characters give :data:`UNKNOWN_INDEX`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < 128, _ASCII[np.minimum(codes, 127)], UNKNOWN_INDEX).astype(np.int64)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"key 'data.path': {path} is not a LEAF Shakespeare json file")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"key 'data.path': cannot read {path} as (gzipped) json: {err}") from err


def _split_from_leaf(leaf: Any, path: Path, name: str) -> Split:
    """One LEAF-json (``users``, ``user_data``) as a split of token sequences with user ids."""
    if not isinstance(leaf, dict) or "users" not in leaf or "user_data" not in leaf:
        raise DataError(f"key 'data.path': the '{name}' part of {path} is not LEAF json (users, user_data)")
    xs: list[str] = []
    ys: list[str] = []
    ids: list[str] = []
    for user in leaf["users"]:
        data = leaf["user_data"].get(user)
        if not isinstance(data, dict) or len(data.get("x", ())) != len(data.get("y", ())):
            raise DataError(f"key 'data.path': {path} '{name}': user {user!r} has no matching x / y lists")
        xs += data["x"]
        ys += data["y"]
        ids += [str(user)] * len(data["x"])
    lengths = {len(x) for x in xs}
    if len(lengths) > 1:
        raise DataError(f"key 'data.path': {path} '{name}' mixes sequence lengths {sorted(lengths)}")
    bad = next((y for y in ys if len(y) != 1), None)
    if bad is not None:
        raise DataError(f"key 'data.path': {path} '{name}': label {bad!r} is not one character")
    seq_len = lengths.pop() if lengths else 0
    tokens = encode("".join(xs)).reshape(len(xs), seq_len)
    return Split(TokenStore(tokens), encode("".join(ys)), np.asarray(ids, dtype=str))


def load_leaf_shakespeare(path: Path | None) -> SourceData:
    """``{"train": LEAF-json, "test": LEAF-json}`` (gzip by suffix) -> train and test splits."""
    assert path is not None
    raw = _read_json(path)
    if not isinstance(raw, dict) or "train" not in raw:
        keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"key 'data.path': {path} needs 'train' (and 'test') LEAF json, found {keys}")
    train = _split_from_leaf(raw["train"], path, "train")
    test = _split_from_leaf(raw["test"], path, "test") if "test" in raw else None
    if len(train) == 0:
        raise DataError(f"key 'data.path': {path} holds no training sample")
    return SourceData(path.name.split(".")[0], train, test, list(CLASS_NAMES))
