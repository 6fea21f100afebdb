"""Figures in the paper's style, written as PNG (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from factedit.io import atomic_write_bytes  # noqa: E402

COLORS = {"subject": "#1f77b4", "non_subject": "#ff7f0e", "last": "#2ca02c"}
LABELS = {"subject": "subject", "non_subject": "non-subject (relation)", "last": "last token"}


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def knockout_figure(curves: dict[str, list[float]], window: int, path: Path, title: str = "",
                    bands: dict[str, list[float]] | None = None, band_label: str = "shaded: 95% band") -> None:
    """Relative change of the prediction's probability when edges into the last position
    are blocked, per window centre layer; one line per source set; ``bands`` (named in the
    legend by ``band_label``) shaded around them."""
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
    handles = ax.get_legend_handles_labels()[0]
    if bands:
        handles.append(Patch(color="grey", alpha=0.3, lw=0, label=band_label))
    ax.legend(handles=handles, fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def knockout_panels(panels: list[tuple[str, dict[str, list[float]], dict[str, list[float]] | None, int]],
                    path: Path) -> None:
    """Knockout curves of several models side by side: (title, curves, bands or None, window)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for ax, (title, curves, bands, window) in zip(axes[0], panels):
        for s, ys in curves.items():
            xs = list(range(len(ys)))
            ax.plot(xs, ys, marker="o", ms=3, color=COLORS.get(s), label=LABELS.get(s, s))
            if bands and s in bands:
                ax.fill_between(xs, [y - b for y, b in zip(ys, bands[s])], [y + b for y, b in zip(ys, bands[s])],
                                color=COLORS.get(s), alpha=0.2, lw=0)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"centre layer of the blocked window (k={window})")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("change of p(prediction) [%]")
    handles = axes[0][0].get_legend_handles_labels()[0]
    if any(bands for _t, _c, bands, _w in panels):
        handles.append(Patch(color="grey", alpha=0.3, lw=0, label="shaded: 95% band"))
    axes[0][0].legend(handles=handles, fontsize=8)
    save_figure(fig, path)


def attribute_rate_figure(rates: dict[str, list[float]], path: Path, title: str = "") -> None:
    """Attribute rate per layer (layer 0 = embeddings), one line per series."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("d", "-.")]  # overlapping series stay visible
    for i, (name, ys) in enumerate(rates.items()):
        marker, ls = styles[i % len(styles)]
        ax.plot(range(len(ys)), ys, marker=marker, ms=4, ls=ls, label=name)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("attribute rate")
    ax.set_title(title or "Subject enrichment: attribute rate at the last subject token")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def head_heatmap(scores: list[list[float]], path: Path, title: str = "", label: str = "score",
                 marks: list[tuple[int, int]] | None = None, mark_label: str = "marked head") -> None:
    """A layer x head heatmap (viridis: dark purple low, yellow high; layer 0 at the bottom);
    ``marks`` (layer, head) get a red box, named by ``mark_label`` in a legend below the plot."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    im = ax.imshow(scores, aspect="auto", origin="lower", cmap="viridis")
    for layer, head in marks or []:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    if marks:
        ax.legend(handles=[Patch(fill=False, ec="red", lw=1.5, label=f"red box: {mark_label}")], fontsize=8,
                  loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title or "Extraction by head")
    fig.colorbar(im, ax=ax, label=label)
    save_figure(fig, path)


def trace_figure(traces: dict, tokens: list[str], subject_span: list[int], path: Path, title: str = "") -> None:
    """ROME's causal-tracing panels: indirect effect per (token position, layer), one panel per
    traced kind (a ``TraceResult`` each); subject tokens marked with *."""
    kinds = list(traces)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.4 * len(kinds), 0.35 * len(tokens) + 1.6), squeeze=False,
                             layout="constrained")
    names = {"hidden": "hidden state", "mlp": "MLP output", "attn": "MHSA output"}
    for ax, kind in zip(axes[0], kinds):
        t = traces[kind]
        eff = [[t.effect[la][i] for la in range(len(t.effect))] for i in range(len(t.positions))]  # (P, L)
        im = ax.imshow(eff, aspect="auto", cmap={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[kind],
                       vmin=min(0.0, min(map(min, eff))))
        ax.set_yticks(range(len(t.positions)))
        ax.set_yticklabels([repr(tokens[p]) + (" *" if subject_span[0] <= p < subject_span[1] else "")
                            for p in t.positions], fontsize=7)
        ax.set_xlabel("centre layer" + ("" if kind == "hidden" else f" (window {t.window})"))
        ax.set_title(f"restore {names[kind]}", fontsize=9)
        fig.colorbar(im, ax=ax, label="indirect effect (p)")
    fig.suptitle((title or "Causal tracing") + " (*: a subject token)", fontsize=9)
    save_figure(fig, path)


def sublayer_figure(sub, path: Path, title: str = "") -> None:
    """Sublayer knockout at the subject positions (a ``SublayerKnockoutResult``): change of
    p(token) at the output, and the attribute rate read higher up, per centre layer of the
    removed window."""
    has_rate = sub.attribute_rate is not None
    fig, axes = plt.subplots(1, 2 if has_rate else 1, figsize=(10 if has_rate else 5.5, 3.4), squeeze=False,
                             layout="constrained")
    colors = {"mlp": "#d62728", "attn": "#9467bd"}
    names = {"mlp": "MLP updates removed", "attn": "MHSA updates removed"}
    ax = axes[0][0]
    for k in ("mlp", "attn"):
        ys = sub.prob_change[k]
        ax.plot(range(len(ys)), ys, marker="o", ms=3, color=colors[k], label=names[k])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(f"centre layer of the removed window (k={sub.window})")
    ax.set_ylabel("change of p(token) [%]")
    ax.set_title("Output probability")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if has_rate:
        ax = axes[0][1]
        for k in ("mlp", "attn"):
            ys = sub.attribute_rate[k]
            ax.plot(range(len(ys)), ys, marker="o", ms=3, color=colors[k], label=names[k])
        ax.axhline(sub.base_attribute_rate, color="black", ls="--", lw=1, label="no knockout")
        ax.set_xlabel(f"centre layer of the removed window (k={sub.window})")
        ax.set_ylabel(f"attribute rate at layer {sub.read_layer}")
        ax.set_title("Subject enrichment")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "Sublayer knockout at the subject positions", fontsize=10)
    save_figure(fig, path)


def projection_figure(proj: dict[str, list[float]], path: Path, token: str, title: str = "") -> None:
    """Probability of the token in the vocabulary projection of the residual stream, of each
    MHSA and of each MLP output at the last position, per layer."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for k, lab, c in (("resid", "residual stream", "black"), ("attn", "MHSA output", "#9467bd"),
                      ("mlp", "MLP output", "#d62728")):
        ys = proj[f"{k}_prob"]
        ax.plot(range(len(ys)), ys, marker="o", ms=3, color=c, label=lab)
        top = [i for i, r in enumerate(proj[f"{k}_rank"]) if r == 1]
        ax.scatter(top, [ys[i] for i in top], s=60, facecolors="none", edgecolors=c)
    ax.scatter([], [], s=60, facecolors="none", edgecolors="grey", label=f"circle: {token.strip()} ranks first")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"p({token.strip()}) in the projection")
    ax.set_title(title or "Vocabulary projection at the last position (circles: rank 1)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def circuit_figures(circuit, out: Path) -> list[Path]:
    """The figures of one RecallCircuit, in the paper's style."""
    out = Path(out)
    fact = f"{circuit.prompt} -> {circuit.prediction.strip()}"
    tok = circuit.target or circuit.prediction
    paths = [out / "knockout.png", out / "projection.png", out / "extraction_heads.png", out / "sublayer_knockout.png"]
    ko = circuit.knockout  # a KnockoutCurves
    knockout_figure({s: ko.curve(s) for s in ("subject", "non_subject", "last")}, ko.window, paths[0],
                    title=f"Attention knockout: {fact}")
    projection_figure(circuit.projection, paths[1], tok)
    head_heatmap(circuit.head_prob, paths[2], title=f"p({tok.strip()}) in each head's output at the last position",
                 label="probability", marks=[(h.layer, h.head) for h in circuit.extraction_heads],
                 mark_label="extraction head")
    sublayer_figure(circuit.sublayer_knockout, paths[3], title=f"Sublayer knockout at the subject: {fact}")
    if circuit.attribute_rate_by_position is not None:
        paths.append(out / "attribute_rate.png")
        by_pos = circuit.attribute_rate_by_position
        attribute_rate_figure({k.replace("_", " ") + " token": v for k, v in by_pos.items()}, paths[-1],
                              title=f"Attribute rate of {circuit.subject!r} by position")
    return paths
