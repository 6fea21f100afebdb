"""Figures in the paper's style, written as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from factedit.io import atomic_write_bytes  # noqa: E402

COLORS = {"subject": "#1f77b4", "non_subject": "#ff7f0e", "last": "#2ca02c"}
LABELS = {"subject": "subject", "non_subject": "non-subject (relation)", "last": "last token"}


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def knockout_figure(curves: dict[str, list[float]], window: int, path: Path, title: str = "",
                    bands: dict[str, list[float]] | None = None) -> None:
    """Relative change of the prediction's probability when edges into the last position
    are blocked, per window centre layer; one line per source set."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for s, ys in curves.items():
        xs = list(range(len(ys)))
        ax.plot(xs, ys, marker="o", ms=3, color=COLORS.get(s), label=LABELS.get(s, s))
        if bands and s in bands:
            lo = [y - b for y, b in zip(ys, bands[s])]
            hi = [y + b for y, b in zip(ys, bands[s])]
            ax.fill_between(xs, lo, hi, color=COLORS.get(s), alpha=0.2, lw=0)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(f"centre layer of the blocked window (k={window})")
    ax.set_ylabel("change of p(prediction) [%]")
    ax.set_title(title or "Attention knockout: edges into the last position")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def attribute_rate_figure(rates: dict[str, list[float]], path: Path, title: str = "") -> None:
    """Attribute rate per layer (layer 0 = embeddings), one line per series."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, ys in rates.items():
        ax.plot(range(len(ys)), ys, marker="o", ms=3, label=name)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("attribute rate")
    ax.set_title(title or "Subject enrichment: attribute rate at the last subject token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def head_heatmap(scores: list[list[float]], path: Path, title: str = "", label: str = "score") -> None:
    """A layer x head heatmap."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    im = ax.imshow(scores, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "Extraction by head")
    fig.colorbar(im, ax=ax, label=label)
    _save(fig, path)
