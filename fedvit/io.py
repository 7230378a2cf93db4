"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer goes through :func:`atomic_write`: the content is written to a temporary file in the
destination's folder (``.<name>.<random>.tmp``, so a folder's cleanup can recognise leftovers),
flushed and ``fsync``-ed, then renamed over the destination with ``os.replace`` (atomic within one
file system). On any error the temporary file is removed and the destination is left as it was.
``durable=False`` skips the ``fsync``: the write stays atomic against a crash of the process (the
data is in the page cache before the rename), not against one of the machine; for files rewritten
on a hot path (a client's private state, every round: the ``fsync`` of its two files cost ~20 ms a
save on this project's VM disk, against ~2-4 ms without).
The helpers below are the formats the project writes: bytes, text, JSON, ``np.savez`` archives
and ``torch.save`` files.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], Any], *, mode: int = 0o666, durable: bool = True
) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then move it to ``path``.

    ``mode``: the new file's permission bits before the umask (``0o600``: the owner alone);
    ``durable``: ``fsync`` before the rename. Missing parent folders are created. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(path: str | Path, data: bytes, *, mode: int = 0o666, durable: bool = True) -> Path:
    """``data`` to ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(data), mode=mode, durable=durable)


def write_text(path: str | Path, text: str, *, mode: int = 0o666, durable: bool = True) -> Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    return write_bytes(path, text.encode(), mode=mode, durable=durable)


def write_json(
    path: str | Path,
    obj: Any,
    *,
    indent: int | None = 1,
    default: Callable[[Any], Any] | None = None,
    end: str = "",
    mode: int = 0o666,
    durable: bool = True,
) -> Path:
    """``json.dumps(obj, indent=indent, default=default) + end`` to ``path``, atomically."""
    return write_text(path, json.dumps(obj, indent=indent, default=default) + end, mode=mode, durable=durable)


def write_npz(
    path: str | Path, arrays: Mapping[str, Any], *, mode: int = 0o666, durable: bool = True
) -> Path:
    """``np.savez`` of ``arrays`` to ``path`` (exactly that name: no ``.npz`` is added), atomically."""
    import numpy as np

    return atomic_write(path, lambda f: np.savez(f, **arrays), mode=mode, durable=durable)


def torch_save(path: str | Path, obj: Any, *, mode: int = 0o666) -> Path:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), mode=mode)
