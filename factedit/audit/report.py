"""An audit's outputs: ``summary.json``, the figures (PNG) and a self-contained ``report.html``."""

from __future__ import annotations

import html
from pathlib import Path

from factedit.audit.relations import NO_RELATION, WIKIDATA_RELATIONS, relation_name
from factedit.audit.summary import POSITIONS, SOURCES, summarise
from factedit.io import atomic_write_text, dumps_json
from factedit.plots import attribute_rate_figure, head_heatmap, knockout_figure, plt, save_figure
from factedit.verify.html import STYLE, embed_png

HUB_MARKS = 5  # knowledge_hubs.png boxes the heads found most often

# Each figure's caption: what it measures, its axes, and every mark, colour and band it draws.
FIGURES = {
    "knockout_mean.png": (
        "Attention knockout, mean over the known facts. x: centre layer of the window of layers (the knockout "
        "window k) in which the last position's attention edges are blocked; y: change of the probability of the "
        "model's prediction [%]. Lines: edges blocked from the subject tokens (blue), from the other tokens before "
        "the last, the relation (orange), and from the last token itself (green); shaded bands: 95% confidence "
        "(mean \u00b1 1.96 standard errors); grey line: no change."),
    "attribute_rate.png": (
        "Attribute rate, mean over the known facts: the share of the top tokens of the residual stream's "
        "vocabulary projection (stopwords left out) that are among the subject's related tokens. x: layer "
        "(0 = embeddings); y: attribute rate. One line per position, named in the legend (each with its own "
        "marker and line style): first subject token, last subject token, the positions between the subject and "
        "the last token (mean over them), last token."),
    "extraction_rate.png": (
        "Extraction rate: the share of the known facts whose MHSA output (purple) or MLP output (red) at the last "
        "position has the attribute on top of its vocabulary projection. x: layer; y: % of the known facts."),
    "knowledge_hubs.png": (
        "Knowledge hubs: how often each attention head is an extraction head (its own output at the last "
        "position has the attribute on top of its vocabulary projection). x: head; y: layer (0 at the bottom); "
        "colour: share of the known facts, dark purple (lowest) to yellow (highest), scale on the right; "
        f"red boxes: the {HUB_MARKS} heads found most often (fewer if fewer heads were found; the first rows of the "
        "knowledge-hub table)."),
    "enrichment_layers.png": (
        "Enrichment MLPs per relation. Rows: relations (Wikidata id and label); x: MLP layer; colour: share of "
        "the relation's known facts whose enrichment MLPs (the layers whose removal at the subject lowers the "
        "attribute rate most) include the layer, black (0) to light yellow (highest), scale on the right."),
    "robustness.png": (
        "Extraction heads across prompts of the same fact (templates and paraphrases), per relation (x). Blue "
        "bars: mean Jaccard similarity of the prompts' extraction-head sets; orange bars: share of the facts "
        "whose prompts all have the same strongest head; y: 0 to 1. Only facts with two or more known prompts "
        "count."),
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
    n = s["known"]
    made = []
    ko = s["knockout"]
    knockout_figure({k: ko[k]["mean"] for k in SOURCES}, header["config"]["knockout_window"], out / "knockout_mean.png",
                    title=f"Attention knockout, mean of {n} known facts", bands={k: ko[k]["band95"] for k in SOURCES},
                    band_label="shaded: 95% confidence band")
    made.append("knockout_mean.png")
    if s.get("attribute_rate"):
        names = {"first_subject": "first subject token", "last_subject": "last subject token",
                 "after_subject": "between subject and last token", "last": "last token"}
        attribute_rate_figure({names[p]: s["attribute_rate"][p]["mean"] for p in POSITIONS if p in s["attribute_rate"]},
                              out / "attribute_rate.png", title=f"Attribute rate by position, mean of {n} facts")
        made.append("attribute_rate.png")
    _extraction_rate_figure(s, out / "extraction_rate.png")
    made.append("extraction_rate.png")
    marks = [(h["layer"], h["head"]) for h in s["hubs"][:HUB_MARKS]]
    head_heatmap(s["head_frequency"], out / "knowledge_hubs.png", label="share of known facts",
                 title="Extraction heads: share of known facts", marks=marks,
                 mark_label=f"the {len(marks)} heads found most often" if len(marks) > 1 else "the head found")
    made.append("knowledge_hubs.png")
    if s["enrichment_per_relation"]:
        _enrichment_figure(s["enrichment_per_relation"], out / "enrichment_layers.png")
        made.append("enrichment_layers.png")
    rob = {r: v for r, v in s["robustness"].items() if v["mean_jaccard"] is not None}
    if rob:
        _robustness_figure(rob, out / "robustness.png")
        made.append("robustness.png")
    return made


def _extraction_rate_figure(s: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for kind, lab, c in (("attn", "MHSA output", "#9467bd"), ("mlp", "MLP output", "#d62728")):
        ys = s["extraction_rate"][kind]
        ax.plot(range(len(ys)), [100 * x for x in ys], marker="o", ms=3, color=c, label=lab)
    ax.set_xlabel("layer")
    ax.set_ylabel("extraction rate [% of known facts]")
    ax.set_title("Attribute on top of the sublayer's projection at the last position")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _enrichment_figure(enrichment: dict[str, list[float]], path: Path) -> None:
    rels = sorted(enrichment)
    fig, ax = plt.subplots(figsize=(5.5, 0.6 + 0.35 * len(rels)))
    im = ax.imshow([enrichment[r] for r in rels], aspect="auto", cmap="magma", vmin=0)
    ax.set_yticks(range(len(rels)), [relation_name(r) for r in rels], fontsize=8)
    ax.set_xlabel("MLP layer")
    ax.set_title("Enrichment MLPs: share of the relation's known facts")
    fig.colorbar(im, ax=ax, label="share of known facts")
    save_figure(fig, path)


def _robustness_figure(rob: dict[str, dict], path: Path) -> None:
    rels = sorted(rob)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    x = range(len(rels))
    ax.bar([i - 0.2 for i in x], [rob[r]["mean_jaccard"] for r in rels], width=0.4, color="#1f77b4",
           label="mean Jaccard of head sets")
    ax.bar([i + 0.2 for i in x], [rob[r]["same_top_head_share"] for r in rels], width=0.4, color="#ff7f0e",
           label="share with the same top head")
    ax.set_xticks(list(x), [relation_name(r) for r in rels], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Extraction heads across templates of the same fact")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _table(rows: list[list], head: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    return ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")


NO_KNOWN = "no known fact"
ONE_PROMPT = "no fact with two known prompts"
def _per_relation_note(relations: dict) -> str:
    """What the per-relation table's columns and its worded cells mean."""
    note = []
    if any(r in WIKIDATA_RELATIONS for r in relations):
        note.append("A relation given as a Wikidata property (ROME's and CounterFact's facts) shows its id and "
                    "English label.")
    if "" in relations:
        note.append(f"\u201c{NO_RELATION}\u201d: dataset records without a relation id.")
    note.append("Top extraction heads: the heads most often an extraction head among the relation's known facts, "
                "as L(layer)H(head) (facts). Main enrichment layer: the MLP layer most often among the facts' "
                "enrichment MLPs. Head-set Jaccard and same top head compare the prompts of one fact (its templates "
                "and paraphrases; <code>factedit audit --paraphrases N</code> adds them), so they need a fact with "
                f"two or more known prompts (\u201c{ONE_PROMPT}\u201d otherwise).")
    if any(not c["known"] for c in relations.values()):
        note.append(f"\u201c{NO_KNOWN}\u201d: the model knows none of the relation's facts in this audit.")
    return " ".join(note)


def _relation_row(s: dict, rel: str, c: dict) -> list:
    """One row of the per-relation table, every empty cell saying why it is empty."""
    if not c["known"]:
        return [relation_name(rel), c["facts"], 0, NO_KNOWN, NO_KNOWN, NO_KNOWN, NO_KNOWN]
    hubs = ", ".join(f"L{h['layer']}H{h['head']} ({h['facts']})" for h in s["hubs_per_relation"].get(rel, []))
    enr = s["enrichment_per_relation"].get(rel)
    top = max(range(len(enr)), key=lambda la: enr[la]) if enr and max(enr) > 0 else "no enrichment MLP found"
    rob = s["robustness"].get(rel)
    if rob is None:
        jaccard = same = ONE_PROMPT
    else:
        jaccard = rob["mean_jaccard"] if rob["mean_jaccard"] is not None else "no extraction head in any prompt"
        same = rob["same_top_head_share"]
    return [relation_name(rel), c["facts"], c["known"], hubs or "no extraction head found", top, jaccard, same]


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
                            ["layer", "head", "known facts where it is an extraction head", "share of known facts"]))
    if s["per_relation"]:
        parts.append("<h2>Per relation</h2>")
        parts.append(_table([_relation_row(s, rel, c) for rel, c in s["per_relation"].items()],
                            ["relation", "facts", "known", "top extraction heads (facts)",
                             "main enrichment layer (MLP)", "head-set Jaccard", "same top head (share of facts)"]))
        parts.append(f"<p class='note'>{_per_relation_note(s['per_relation'])}</p>")
    run = s.get("run", {})
    parts.append(f"<p class='note'>This run: {run.get('facts_this_run')} facts in {run.get('seconds_this_run')} s "
                 f"on {run.get('processes')} process(es).</p></body></html>")
    return "".join(parts)
