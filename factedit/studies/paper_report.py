"""The paper's study's outputs (``factedit.studies.paper``): the side-by-side table against
what the paper reports, the figures, ``study.json`` and ``table.md``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from factedit.io import atomic_write_text, dumps_json
from factedit.studies.paper_record import POSITIONS, SOURCES

if TYPE_CHECKING:
    from factedit.studies.paper import Study


# What the paper reports, as summarised in ../shared/reference.md and the review in
# ../shared/seeds (GPT-2 XL; GPT-J values are not in those notes: "n/r").
PAPER = {
    "knockout_window": ("9 of 48 layers", "n/r"),
    "subject_first_below_-50": ("upper layers (qualitative)", "n/r"),
    "relation_first_below": ("earlier than the subject's (qualitative)", "n/r"),
    "relation_before_subject": ("yes: relation edges matter first", "n/r"),
    "attribute_rate_last_subject_max": ("~0.50, upper-middle layers", "n/r"),
    "attribute_rate_other_positions_max": ("far lower than the last subject token", "n/r"),
    "mhsa_extraction_share": ("~0.68 of facts", "n/r"),
    "mlp_extraction_share": ("much rarer than MHSA", "n/r"),
    "extraction_head_share": ("heads act as knowledge hubs", "n/r"),
    "ov_rank_le10_share": ("heads' OV maps rank the attribute high", "n/r"),
    "not_top_in_subject_share": ("attribute often low in the subject before extraction", "n/r"),
    "early_mlp_rate_drop": ("large (early MLPs matter)", "n/r"),
    "upper_mlp_rate_drop": ("small", "n/r"),
    "paraphrase_head_jaccard": ("not studied", "not studied"),
    "two_hop_two_step_share": ("not studied", "not studied"),
}


# ---- table -------------------------------------------------------------------------------------

def _layer(x) -> str:
    return "none" if x is None else f"L{x}"


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{100 * x:.0f}%" if pct else f"{x:.3g}"
    return str(x)


def table_rows(s: dict) -> list[dict]:
    """The side-by-side rows: measure, paper (GPT-2 XL, GPT-J), this model, n."""
    rows = []

    def add(key, label, value, n):
        gpt2, gptj = PAPER.get(key, ("", ""))
        rows.append({"key": key, "measure": label, "gpt2_xl": gpt2, "gpt_j": gptj, "this_model": value, "n": n})

    fl, en, ex, em = s["flow"], s["enrichment"], s["extraction"], s["early_mlp"]
    n = s["facts_known"]
    add("knockout_window", "knockout window k", f"{s['config']['knockout_window']} of {s['n_layers']} layers", n)
    if fl:
        fb = fl["first_below"]
        add("subject_first_below_-50", "mean curve first below -20% / -50% (subject)",
            f"{_layer(fb['subject']['-20'])} / {_layer(fb['subject']['-50'])}", n)
        add("relation_first_below", "mean curve first below -20% / -50% (non-subject)",
            f"{_layer(fb['non_subject']['-20'])} / {_layer(fb['non_subject']['-50'])}", n)
        add("last_first_below", "mean curve first below -20% / -50% (last)",
            f"{_layer(fb['last']['-20'])} / {_layer(fb['last']['-50'])}", n)
        rb = fl["relation_before_subject"]
        add("relation_before_subject", "relation before subject, per fact (-20% crossing; argmin)",
            f"{_fmt(rb['-20']['share'], True)} of {rb['-20']['decided']}; {_fmt(rb['argmin']['share'], True)}", n)
    if en:
        ll = en["logit_lens"]
        add("attribute_rate_last_subject_max", "attribute rate, last subject token, max over layers (lens / raw)",
            f"{_fmt(ll['last_subject']['max'])} (L{ll['last_subject']['max_layer']}) / "
            f"{_fmt(en['raw']['last_subject']['max'])}", en["n"])
        others = {p: ll[p]["max"] for p in ("first_subject", "after_subject", "last") if p in ll}
        add("attribute_rate_other_positions_max", "attribute rate, other positions, max (lens)",
            ", ".join(f"{p} {_fmt(v)}" for p, v in others.items()), en["n"])
        if "control_last_subject" in en:
            add("attribute_rate_control", "control: another subject's text, last subject token, max",
                _fmt(en["control_last_subject"]["max"]), en["n"])
    if ex:
        add("mhsa_extraction_share", "facts with an MHSA extraction event (lens / raw)",
            f"{_fmt(ex['logit_lens']['facts_with_event']['attn'], True)} / "
            f"{_fmt(ex['raw']['facts_with_event']['attn'], True)}", ex["n"])
        add("mlp_extraction_share", "facts with an MLP extraction event (lens / raw)",
            f"{_fmt(ex['logit_lens']['facts_with_event']['mlp'], True)} / "
            f"{_fmt(ex['raw']['facts_with_event']['mlp'], True)}", ex["n"])
        add("extraction_head_share", "facts with an extraction head (rank-1 head)",
            _fmt(ex["facts_with_extraction_head"], True), ex["n"])
        ov = ex["ov_check"]
        add("ov_rank_le10_share", "OV check: heads whose OV map ranks the attribute <= 10 (median rank)",
            f"{_fmt(ov['rank_le10_share'], True)} (median {_fmt(ov['median_rank'])})", ov["heads_checked"])
        sr = ex["subject_rank_before_extraction"]
        add("not_top_in_subject_share", "attribute not top-1 / rank > 10 in the subject before the MHSA event",
            f"{_fmt(sr['not_top1_share'], True)} / {_fmt(sr['rank_gt10_share'], True)} "
            f"(median rank {_fmt(sr['median_rank'])})", sr["facts"])
    if em:
        for name, key in (("early", "early_mlp_rate_drop"), ("upper", "upper_mlp_rate_drop")):
            v = em[name]
            win = em[f"{name}_window"]
            if v is None:
                continue
            rate = _fmt(v.get("attribute_rate_drop"))
            add(key, f"{name} MLPs removed at the subject (L{win[0]}-{win[-1]}): rate drop at L{em['read_layer']}; "
                     "mean max MHSA p(attr) change; output p change",
                f"{rate}; {_fmt(v['extraction_change'])}%; {_fmt(v['prob_change'])}%", em["n"])
    pa = s.get("paraphrase")
    if pa and pa.get("pairs"):
        add("paraphrase_head_jaccard",
            "paraphrases: head Jaccard; same subject-knockout window; mean abs. enrichment-peak shift",
            f"{_fmt(pa['head_jaccard']['mean'])}; {_fmt(pa['subject_window_shift']['same_share'], True)}; "
            f"{_fmt(pa['enrichment_peak_shift']['mean_abs'])}", pa["pairs"])
    th = s.get("two_hop")
    if th is not None:
        add("two_hop_two_step_share", "two-hop: composed right / located; two-step flow share",
            f"{th['composed_right']} of {th['hop2_known']} chains; {_fmt(th['two_step_share'], True)}",
            th["located"])
    return rows


def format_table(rows: list[dict], model_label: str = "this model") -> str:
    head = ["measure", "paper GPT-2 XL", "paper GPT-J", model_label, "n"]
    body = [[r["measure"], r["gpt2_xl"], r["gpt_j"], r["this_model"], str(r["n"])] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines)


# ---- outputs -----------------------------------------------------------------------------------

FIGURES = ("knockout_bands.png", "attribute_rate.png", "attribute_rate_raw.png", "extraction_rate.png",
           "early_mlp.png", "two_hop_knockout.png")


def write_study(out: Path, study: Study, descriptions: dict | None) -> list[str]:
    from factedit.plots import attribute_rate_figure, knockout_figure, plt, save_figure

    s = study.summary
    out.mkdir(parents=True, exist_ok=True)
    made = []
    n = s["facts_known"]
    if s["flow"]:
        fl = s["flow"]["curves"]
        knockout_figure({k: fl[k]["mean"] for k in SOURCES}, s["config"]["knockout_window"],
                        out / "knockout_bands.png", title=f"Attention knockout, mean of {n} facts (95% bands)",
                        bands={k: fl[k]["band95"] for k in SOURCES})
        made.append("knockout_bands.png")
    en = s["enrichment"]
    if en:
        for proj, name in (("logit_lens", "attribute_rate.png"), ("raw", "attribute_rate_raw.png")):
            series = {p: en[proj][p]["mean"] for p in POSITIONS if p in en[proj]}
            if proj == "logit_lens" and "control_last_subject" in en:
                series["control (last subject)"] = en["control_last_subject"]["mean"]
            attribute_rate_figure(series, out / name, title=f"Attribute rate ({proj}), {en['n']} facts, "
                                                            f"text: {s['related_source']}")
            made.append(name)
    ex = s["extraction"]
    if ex:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for proj, ls in (("logit_lens", "-"), ("raw", ":")):
            for kind, lab, col in (("attn", "MHSA", "#9467bd"), ("mlp", "MLP", "#d62728")):
                ys = [100 * x for x in ex[proj]["rate_by_layer"][kind]]
                ax.plot(range(len(ys)), ys, ls=ls, marker="o", ms=3, color=col, label=f"{lab} ({proj})")
        ax.set_xlabel("layer")
        ax.set_ylabel("extraction events [% of facts]")
        ax.set_title(f"Attribute at rank 1 of the sublayer's projection, {ex['n']} facts")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save_figure(fig, out / "extraction_rate.png")
        made.append("extraction_rate.png")
    em = s["early_mlp"]
    if em:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        if "attribute_rate_drop" in em["curves"]:
            ax.plot([100 * (y or 0) for y in em["curves"]["attribute_rate_drop"]], marker="o", ms=3,
                    label=f"attribute rate drop at L{em['read_layer']} (x100)", color="#1f77b4")
        ax.plot([y or 0 for y in em["curves"]["extraction_change"]], marker="s", ms=3, color="#9467bd",
                label="change of max MHSA p(attr) [%]")
        ax.axvline(em["read_layer"], color="grey", ls=":", lw=1)
        ax.set_xlabel(f"centre layer of the removed MLP window (w={em['window']})")
        ax.set_title("MLP updates removed at the subject positions")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save_figure(fig, out / "early_mlp.png")
        made.append("early_mlp.png")
    th = s.get("two_hop")
    if th and th.get("knockout"):
        knockout_figure({k: th["knockout"][k]["mean"] for k in ("subject", "non_subject")},
                        s["config"]["knockout_window"], out / "two_hop_knockout.png",
                        title=f"Two-hop queries, mean of {th['located']}",
                        bands={k: th["knockout"][k]["band95"] for k in ("subject", "non_subject")})
        made.append("two_hop_knockout.png")
    s["figures"] = made
    data = {**s, "facts": study.records, "paraphrase_pairs": study.paraphrases, "two_hop_chains": study.chains}
    if descriptions is not None:
        data["descriptions"] = descriptions
    atomic_write_text(out / "study.json", dumps_json(data, indent=1))
    atomic_write_text(out / "table.md", format_table(s["table"]) + "\n")
    return made
