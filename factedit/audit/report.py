"""An audit's outputs: ``summary.json``, the figures (PNG) and a self-contained ``report.html``."""

from __future__ import annotations

import html
from pathlib import Path

from factedit.audit.summary import POSITIONS, SOURCES, summarise
from factedit.io import atomic_write_text, dumps_json
from factedit.plots import attribute_rate_figure, head_heatmap, knockout_figure, plt, save_figure
from factedit.verify.html import STYLE, embed_png

FIGURES = {
    "knockout_mean.png": "Attention knockout, mean over known facts (bands: 95% confidence)",
    "attribute_rate.png": "Attribute rate by layer and position",
    "extraction_rate.png": "Extraction rate by layer: MHSA against MLP",
    "knowledge_hubs.png": "How often each head is an extraction head (knowledge hubs)",
    "enrichment_layers.png": "Enrichment MLP layers per relation",
    "robustness.png": "Stability of the extraction heads across templates and paraphrases",
}


def write_outputs(out: Path, records: list[dict], header: dict, run: dict) -> dict:
    summary = summarise(records, header["n_layers"], header["n_heads"])
    summary["run"] = run
    summary["model"] = header["model"]
    summary["dataset"] = header["dataset"]
    atomic_write_text(out / "summary.json", dumps_json(summary, indent=1))
    figs = write_figures(out, summary, header)
    atomic_write_text(out / "report.html", render(summary, header, [out / f for f in figs]))
    return summary


def write_figures(out: Path, s: dict, header: dict) -> list[str]:
    if not s["known"]:
        return []
    L = s["n_layers"]
    n = s["known"]
    made = []
    ko = s["knockout"]
    knockout_figure({k: ko[k]["mean"] for k in SOURCES}, header["config"]["knockout_window"], out / "knockout_mean.png",
                    title=f"Attention knockout, mean of {n} known facts", bands={k: ko[k]["band95"] for k in SOURCES})
    made.append("knockout_mean.png")
    if s.get("attribute_rate"):
        names = {"first_subject": "first subject token", "last_subject": "last subject token",
                 "after_subject": "later positions", "last": "last token"}
        attribute_rate_figure({names[p]: s["attribute_rate"][p]["mean"] for p in POSITIONS if p in s["attribute_rate"]},
                              out / "attribute_rate.png", title=f"Attribute rate by position, mean of {n} facts")
        made.append("attribute_rate.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for kind, lab, c in (("attn", "MHSA", "#9467bd"), ("mlp", "MLP", "#d62728")):
        ax.plot(range(L), [100 * x for x in s["extraction_rate"][kind]], marker="o", ms=3, color=c, label=lab)
    ax.set_xlabel("layer")
    ax.set_ylabel("extraction rate [% of facts]")
    ax.set_title("Attribute on top of the sublayer's projection at the last position")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, out / "extraction_rate.png")
    made.append("extraction_rate.png")

    head_heatmap(s["head_frequency"], out / "knowledge_hubs.png", label="share of facts",
                 title="Extraction heads: share of known facts", marks=[(h["layer"], h["head"]) for h in s["hubs"][:5]])
    made.append("knowledge_hubs.png")

    rels = sorted(s["enrichment_per_relation"])
    if rels:
        fig, ax = plt.subplots(figsize=(5.5, 0.6 + 0.35 * len(rels)))
        im = ax.imshow([s["enrichment_per_relation"][r] for r in rels], aspect="auto", cmap="magma", vmin=0)
        ax.set_yticks(range(len(rels)), rels, fontsize=8)
        ax.set_xlabel("MLP layer")
        ax.set_title("Enrichment MLPs: share of the relation's facts")
        fig.colorbar(im, ax=ax)
        save_figure(fig, out / "enrichment_layers.png")
        made.append("enrichment_layers.png")

    rob = {r: v for r, v in s["robustness"].items() if v["mean_jaccard"] is not None}
    if rob:
        rels = sorted(rob)
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        x = range(len(rels))
        ax.bar([i - 0.2 for i in x], [rob[r]["mean_jaccard"] for r in rels], width=0.4,
               label="mean Jaccard of head sets")
        ax.bar([i + 0.2 for i in x], [rob[r]["same_top_head_share"] for r in rels], width=0.4,
               label="share with the same top head")
        ax.set_xticks(list(x), rels, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("Extraction heads across templates of the same fact")
        ax.legend(fontsize=8)
        save_figure(fig, out / "robustness.png")
        made.append("robustness.png")
    return made


def _table(rows: list[list], head: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")


def render(s: dict, header: dict, figures: list[Path]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>factedit audit</title><style>{STYLE}</style>"
             "</head><body><h1>Where the model retrieves its knowledge</h1>",
             f"<p class='note'>model {html.escape(header['model'])} (fingerprint {header['model_fingerprint']}), "
             f"dataset {html.escape(header['dataset'])}, knockout window {header['config']['knockout_window']}</p>",
             _table([[s["facts"], s["known"], s["unknown"], s["errors"], s["known_share"]]],
                    ["facts", "known", "not known (filtered out)", "errors", "known share"])]
    if s["known"]:
        parts.append('<div class="figs">' + "".join(
            f'<figure><img src="{embed_png(p)}"><figcaption>{html.escape(FIGURES[p.name])}</figcaption></figure>'
            for p in figures) + "</div>")
        parts.append("<h2>Knowledge hubs</h2>")
        parts.append(_table([[h["layer"], h["head"], h["facts"], h["share"]] for h in s["hubs"]],
                            ["layer", "head", "facts", "share of known facts"]))
        parts.append("<h2>Per relation</h2>")
        rows = []
        for rel, c in s["per_relation"].items():
            hubs = ", ".join(f"L{h['layer']}H{h['head']} ({h['facts']})" for h in s["hubs_per_relation"].get(rel, []))
            enr = s["enrichment_per_relation"].get(rel)
            top = max(range(len(enr)), key=lambda la: enr[la]) if enr and max(enr) > 0 else "n/a"
            rob = s["robustness"].get(rel, {})
            rows.append([rel or "(none)", c["facts"], c["known"], hubs or "none", top,
                         rob.get("mean_jaccard") if rob.get("mean_jaccard") is not None else "n/a",
                         rob.get("same_top_head_share", "n/a")])
        parts.append(_table(rows, ["relation", "facts", "known", "top extraction heads (facts)",
                                   "main enrichment layer", "head-set Jaccard", "same top head"]))
    run = s.get("run", {})
    parts.append(f"<p class='note'>This run: {run.get('facts_this_run')} facts in {run.get('seconds_this_run')} s "
                 f"on {run.get('processes')} process(es).</p></body></html>")
    return "".join(parts)
