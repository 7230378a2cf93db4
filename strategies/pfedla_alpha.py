"""pFedLA's learned aggregation weights α (``<run dir>/alpha.npz``) as heatmaps (``fedvit alpha``,
pFedLA's own subcommand: :func:`alpha_command`).

``alpha.npz`` is written by the pFedLA / HeurpFedLA strategy after every round (its format is
:data:`ALPHA_KEYS`): ``alpha`` ``[N, L, N]`` float64, row i = what client i's hypernetwork gives
over the N clients for each of the L aggregation layers (``layers``); ``alpha_used`` the same with
HeurpFedLA's kept-local layers one-hot on self (what θ̄_i was built from; = ``alpha`` for
pFedLA); ``round``; ``trained`` (clients whose update reached their hypernetwork); ``heur_k``.

The plot is a grid with one N × N heatmap per layer (row i: client i's weights over the clients
j) and, when the run's ``results.json`` has the clients' training label histograms, a first panel
with the clients' label overlap (cosine similarity of the histograms). Clients are ordered by
their most frequent training label, so clients that share labels sit together; if pFedLA learns
the label-sharing structure, the α panels repeat the overlap panel's blocks.
:func:`label_correlation` puts a number on it: per layer, the Pearson correlation between α_ij
and the label overlap of i and j over the pairs i ≠ j.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedvit.cli.common import EXIT_CONFIG, eprint
from fedvit.io import write_npz
from fedvit.registry import register_command

ALPHA_FILE = "alpha.npz"
ALPHA_PLOT = "alpha.png"
ALPHA_KEYS = ("alpha", "alpha_used", "layers", "round", "trained", "heur_k")


class AlphaError(ValueError):
    """A missing or malformed ``alpha.npz`` (or run directory)."""


@dataclass
class AlphaMatrix:
    """The content of ``alpha.npz``."""

    alpha: np.ndarray  # [N, L, N]
    alpha_used: np.ndarray  # [N, L, N]
    layers: list[str]
    round: int
    trained: list[int]
    heur_k: int

    @property
    def num_clients(self) -> int:
        return int(self.alpha.shape[0])

    def layer(self, name_or_index: str | int, used: bool = False) -> np.ndarray:
        """The N × N matrix of one layer (row i: client i's weights over the clients)."""
        idx = self.layers.index(name_or_index) if isinstance(name_or_index, str) else int(name_or_index)
        return (self.alpha_used if used else self.alpha)[:, idx, :]


def save_alpha(path: Path, m: AlphaMatrix) -> None:
    """Write ``m`` atomically (:func:`fedvit.io.write_npz`; no ``fsync``: rewritten every round)."""
    write_npz(
        path,
        {
            "alpha": np.asarray(m.alpha, dtype=np.float64),
            "alpha_used": np.asarray(m.alpha_used, dtype=np.float64),
            "layers": np.asarray(m.layers, dtype=str),
            "round": np.asarray(m.round, dtype=np.int64),
            "trained": np.asarray(m.trained, dtype=np.int64),
            "heur_k": np.asarray(m.heur_k, dtype=np.int64),
        },
        durable=False,
    )


def alpha_path(run_dir_or_file: Path) -> Path:
    """``alpha.npz`` of a run directory, or the file itself."""
    p = Path(run_dir_or_file)
    return p / ALPHA_FILE if p.is_dir() else p


def load_alpha(run_dir_or_file: Path) -> AlphaMatrix:
    """Read ``alpha.npz`` (checked: keys and shapes)."""
    path = alpha_path(run_dir_or_file)
    if not path.is_file():
        raise AlphaError(
            f"no {ALPHA_FILE} in {path.parent}: pFedLA and HeurpFedLA runs write it after each round"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ALPHA_KEYS if k not in z.files]
            if missing:
                raise AlphaError(f"{path}: missing {missing}")
            data = {k: z[k] for k in ALPHA_KEYS}
    except (OSError, ValueError) as err:
        if isinstance(err, AlphaError):
            raise
        raise AlphaError(f"{path}: cannot read it: {err}") from err
    alpha, used = data["alpha"], data["alpha_used"]
    layers = [str(x) for x in data["layers"].tolist()]
    n = alpha.shape[0] if alpha.ndim == 3 else -1
    if alpha.shape != (n, len(layers), n) or used.shape != alpha.shape:
        raise AlphaError(
            f"{path}: alpha {alpha.shape} / alpha_used {used.shape} are not "
            f"[clients, {len(layers)} layers, clients]"
        )
    trained = [int(c) for c in data["trained"].tolist()]
    return AlphaMatrix(alpha, used, layers, int(data["round"]), trained, int(data["heur_k"]))


def label_histograms(run_dir: Path, num_clients: int) -> np.ndarray | None:
    """``[N, classes]`` training label counts from the run's ``results.json`` (None if absent)."""
    try:
        clients = json.loads((Path(run_dir) / "results.json").read_text()).get("clients") or {}
        rows = [clients[str(i)]["train_hist"] for i in range(num_clients)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    width = max(len(r) for r in rows)
    return np.array([list(r) + [0] * (width - len(r)) for r in rows], dtype=np.float64)


def label_overlap(hists: np.ndarray) -> np.ndarray:
    """Cosine similarity of the clients' label histograms (``[N, N]``, 1 on the diagonal)."""
    norm = np.linalg.norm(hists, axis=1, keepdims=True)
    unit = hists / np.where(norm > 0, norm, 1.0)
    return unit @ unit.T


def label_order(hists: np.ndarray | None, n: int) -> np.ndarray:
    """Clients by most frequent label, then by the share of it (descending), then by id."""
    if hists is None:
        return np.arange(n)
    top = hists.argmax(axis=1)
    share = hists.max(axis=1) / np.maximum(hists.sum(axis=1), 1)
    return np.array(sorted(range(n), key=lambda i: (int(top[i]), -float(share[i]), i)))


def label_correlation(m: AlphaMatrix, overlap: np.ndarray, used: bool = False) -> dict[str, float]:
    """Per layer name, :func:`layer_correlations` of ``m``'s α (``used``: as HeurpFedLA used it)."""
    return dict(zip(m.layers, layer_correlations(m.alpha_used if used else m.alpha, overlap), strict=True))


def layer_correlations(alpha: np.ndarray, overlap: np.ndarray) -> list[float]:
    """Per layer of ``alpha`` (``[N, L, N]``), Pearson's r between α_ij and the label overlap of
    i and j over pairs i ≠ j (NaN when either is constant there, e.g. α still uniform)."""
    off = ~np.eye(alpha.shape[0], dtype=bool)
    y = overlap[off]
    out: list[float] = []
    for layer in range(alpha.shape[1]):
        x = alpha[:, layer, :][off]
        out.append(float(np.corrcoef(x, y)[0, 1]) if np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan)
    return out


def plot_alpha(run_dir_or_file: Path, out: Path | None = None, *, used: bool = False, dpi: int = 110) -> Path:
    """One heatmap per aggregation layer (and the label overlap, when known) in one PNG;
    default ``<run dir>/alpha.png`` (``alpha-used.png`` with ``used``). Returns the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = alpha_path(run_dir_or_file)
    m = load_alpha(path)
    run_dir = path.parent
    hists = label_histograms(run_dir, m.num_clients)
    order = label_order(hists, m.num_clients)
    panels: list[tuple[str, np.ndarray]] = []
    if hists is not None:
        panels.append(("label overlap (cosine)", label_overlap(hists)))
    corr = label_correlation(m, label_overlap(hists), used) if hists is not None else {}
    for name in m.layers:
        r = corr.get(name, math.nan)
        title = f"α {name}" + ("" if math.isnan(r) else f"  (r={r:.2f})")
        panels.append((title, m.layer(name, used)))
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.1 * rows), squeeze=False)
    ticks = order if m.num_clients <= 20 else None
    for ax, (title, mat) in zip(axes.ravel(), panels, strict=False):
        shown = mat[np.ix_(order, order)]
        vmax = 1.0 if title.startswith("label") else max(float(shown.max()), 1e-12)
        im = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("client j", fontsize=8)
        ax.set_ylabel("client i", fontsize=8)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), [str(t) for t in ticks], fontsize=6)
            ax.set_yticks(range(len(ticks)), [str(t) for t in ticks], fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    kind = "used (HeurpFedLA local layers one-hot)" if used else "learned"
    order_note = "clients ordered by most frequent label" if hists is not None else "clients by id"
    fig.suptitle(
        f"pFedLA α {kind} after round {m.round} ({m.num_clients} clients, {len(m.trained)} trained; "
        f"{order_note})",
        fontsize=10,
    )
    fig.tight_layout()
    target = Path(out) if out is not None else run_dir / ("alpha-used.png" if used else ALPHA_PLOT)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=dpi)
    plt.close(fig)
    return target


# --------------------------------------------------------------------------- fedvit alpha


@register_command("alpha", help="heatmaps of a pFedLA run's learned aggregation weights α")
def alpha_command(argv: Sequence[str]) -> int:
    """``fedvit alpha RUN_DIR [-o FILE.png] [--used]``: the heatmaps, and per layer the correlation
    of α with the clients' label overlap (when the run recorded label histograms)."""
    p = argparse.ArgumentParser(
        prog="fedvit alpha",
        description="Plot <run dir>/alpha.npz (written by pFedLA / HeurpFedLA after every round): one "
        "clients × clients heatmap per aggregation layer, clients ordered by their most frequent label, "
        "beside the clients' label overlap; prints per layer the correlation of α with the overlap.",
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a pFedLA run directory (or its alpha.npz)")
    p.add_argument("-o", "--out", type=Path, metavar="FILE.png", help="default: <run dir>/alpha.png")
    p.add_argument("--used", action="store_true", help="α as used (HeurpFedLA's local layers one-hot)")
    args = p.parse_args(list(argv))
    try:
        m = load_alpha(args.run_dir)
        out = plot_alpha(args.run_dir, args.out, used=args.used)
    except AlphaError as err:
        eprint(f"error: {err}")
        return EXIT_CONFIG
    hists = label_histograms(alpha_path(args.run_dir).parent, m.num_clients)
    if hists is not None:
        corr = label_correlation(m, label_overlap(hists), used=args.used)
        print("layer\tr(α, label overlap)")
        for name, r in corr.items():
            print(f"{name}\t{r:.3f}")
    print(out, flush=True)
    return 0
