"""A self-contained HTML page for a verify report: a summary table, then each edit with its
checks and the flow figures before and after, side by side (PNG embedded as base64)."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path

from factedit.plots import knockout_figure, projection_figure

MAX_FIGURE_EDITS = 30

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; }
.figs { display: flex; gap: 8px; flex-wrap: wrap; } .figs figure { margin: 0; }
.figs img { width: 520px; } figcaption { font-size: 13px; color: #555; }
.note { color: #555; font-size: 14px; }
"""

# (key, label, what a missing value means)
METRICS = [
    ("efficacy_score", "Efficacy score (ES): share of edit prompts where the new attribute beats the true one",
     "not measured"),
    ("efficacy_magnitude", "Efficacy magnitude: p(new) - p(true) on the edit prompt", "not measured"),
    ("paraphrase_score", "Paraphrase score (PS): share of paraphrases where the new attribute beats the true one",
     "no paraphrase prompts"),
    ("neighbourhood_score", "Neighbourhood score (NS): share of other subjects' prompts where the true attribute "
     "still beats the new one", "no neighbour prompts"),
    ("reliability_accuracy", "Reliability: token accuracy of the new attribute on the edit prompt (EasyEdit-style)",
     "not measured"),
    ("generalisation_accuracy", "Generalisation: token accuracy of the new attribute on the paraphrases",
     "no paraphrase prompts"),
    ("locality_accuracy", "Locality: share of neighbour prompts whose top tokens along the true attribute "
     "(teacher-forced) are unchanged", "no neighbour prompts"),
    ("portability", "Portability: share of one-hop consequences (e.g. the currency of the city's country) whose "
     "top-1 follows the new attribute", "no consequences known"),
    ("portability_moved", "Portability, moved: share of consequences where the new one beats the old by mean "
     "token NLL", "no consequences known"),
    ("fluency_before", "Fluency before the edit: n-gram entropy of a text the base model generates",
     "not measured (fluency off)"),
    ("fluency_after", "Fluency after the edit: n-gram entropy of a text the edited model generates",
     "not measured (fluency off)"),
]

def _fmt(v, missing: str = "n/a") -> str:
    """A value for a cell; ``missing`` says what None means there."""
    if v is None:
        return html.escape(missing)
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def embed_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _captions(c: dict, label: str, tok: str) -> tuple[str, str]:
    """The knockout and projection figures' captions: axes, lines, bands and marks."""
    k = c["knockout"]["window"]
    pred = html.escape(c["prediction"].strip())
    ko = (f"{label}: attention knockout. x: centre layer of the window of {k} layers in which the last position's "
          f"attention edges are blocked; y: change of p({pred}), the model's prediction [%]. Lines: edges from the "
          "subject tokens (blue), from the other tokens before the last, the relation (orange), and from the last "
          "token itself (green); grey line: no change.")
    tok = html.escape(tok)
    proj = (f"{label}: vocabulary projection at the last position. x: layer; y: p({tok}) in the projection of the "
            "residual stream (black), of the MHSA output (purple) and of the MLP output (red); circles: layers where "
            f"{tok} is the top token.")
    return ko, proj


def _figures(edit: dict, i: int, tmp: Path) -> str:
    cells = []
    for when in ("before", "after"):
        c = edit["circuits"].get(when)
        if not c:
            continue
        k = tmp / f"{i}_{when}_ko.png"
        p = tmp / f"{i}_{when}_proj.png"
        label = "base model" if when == "before" else "edited model"
        tok = (c.get("target") or c["prediction"]).strip()
        knockout_figure({s: c["knockout"][s] for s in ("subject", "non_subject", "last")}, c["knockout"]["window"],
                        k, title=f"{label}: knockout, p({c['prediction'].strip()})")
        projection_figure(c["projection"], p, tok, title=f"{label}: projection at the last position")
        cells.append((k, p, *_captions(c, label, tok)))
    rows = []
    for j in (0, 1):
        rows.append('<div class="figs">' + "".join(
            f'<figure><img src="{embed_png(c[j])}"><figcaption>{c[j + 2]}</figcaption></figure>' for c in cells)
            + "</div>")
    return "".join(rows)


def _verdict(e: dict) -> str:
    """"pass", "fail" or "incomplete" (a check that needs prompts did not run); reports without
    a verdict field: from ``passed``."""
    return html.escape(str(e.get("verdict") or ("pass" if e["passed"] else "fail")))


def _layers(layers: list[int]) -> str:
    return ", ".join(f"L{la}" for la in layers) or "none"


def _flow_rows(e: dict) -> list[tuple[str, str]]:
    """The per-edit table: each check (a)-(e) and metric, labelled in words."""
    f, b, d = e["flow"], e["flow"]["b_extraction"], e["flow"]["d_overlap"]
    new = html.escape(e["request"]["target_new"])
    targeted = ""
    if b["targeted"]:
        targeted = (f"; the edit wrote into {html.escape(', '.join(b['targeted']))}: "
                    f"{'extracted there' if b['in_targeted_components'] else 'extracted elsewhere'}")
    return [
        ("(a) the edited model's prediction on the edit prompt",
         f"{html.escape(f['a_prediction'].strip())} ({'the new attribute' if f['a_ok'] else 'not the new attribute'})"),
        ("(a) share of the re-located paraphrases that predict the new attribute",
         _fmt(f["a_paraphrases_ok"], "no paraphrases located")),
        ("(b) where the edited model extracts the new attribute (rank 1 at the last position)",
         html.escape(b["where"]) + targeted),
        ("(c) blocking the subject's edges into the last position, in the window where the base model reads the "
         "subject", f"window centred at layer {f['c_read_window_centre']}: p({new}) changes by "
         f"{_fmt(-f['c_drop_percent'])} %"),
        (f"(c) share of the edit's gain in p({new}) that survives that blocking",
         _fmt(f["c_gain_surviving_knockout"], "not computed: the edit added nothing to p(new)")),
        ("(d) extraction heads before and after the edit: Jaccard similarity",
         _fmt(d["extraction_heads_jaccard"], "no extraction heads before or after")),
        ("(d) enrichment MLP layers, before the edit \u2192 after (strongest first)",
         f"{_layers(d['enrichment_before'])} &rarr; {_layers(d['enrichment_after'])}"),
        ("(e) share of neighbour prompts whose prediction is unchanged",
         _fmt(f["e_neighbours"].get("predictions_unchanged"), "no neighbour prompts")),
    ] + [(label, _fmt(e["metrics"].get(k), missing)) for k, label, missing in METRICS[:9]]


def render_html(report: dict) -> str:
    s = report["summary"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>factedit verify</title>"
             f"<style>{STYLE}</style></head><body>",
             "<h1>Edit verification</h1>",
             f"<p>Base model <code>{html.escape(report['base_model'])}</code>, edit "
             f"<code>{html.escape(report['edit'])}</code>.</p>",
             f"<p><span class='{'pass' if s['passed'] == s['n_edits'] else 'fail'}'>{s['passed']} of "
             f"{s['n_edits']} edits pass.</span></p>",
             "<p class='note'>An edit passes when (a) the edited model predicts the new attribute, (c) blocking "
             "the subject's edges into the last position, where the base model reads the subject, takes away "
             "at least half of what the edit added to p(new) (so it is recalled from the subject, not written "
             "regardless of it), (e) neighbouring subjects keep "
             "their predictions, and the scores reach their floors. (b) where the new attribute is extracted and "
             "(d) the overlap of the circuits are reported, and (f) portability where the request's one-hop "
             "consequences are known (it is measured: the flow checks do not predict it).</p>",
             "<h2>Summary (means over edits)</h2><table>"]
    for k, label, missing in METRICS:
        if k in s:
            parts.append(f"<tr><th>{label}</th><td>{_fmt(s[k], missing)}</td></tr>")
    parts.append("</table><h2>Edits</h2><table><tr><th>#</th><th>edit prompt &rarr; new attribute</th>"
                 "<th>verdict</th><th>why it did not pass</th></tr>")
    for i, e in enumerate(report["edits"]):
        r = e["request"]
        fill = r["prompt"].replace("{}", r["subject"])
        parts.append(f"<tr><td><a href='#e{i}'>{i + 1}</a></td><td>{html.escape(fill)} &rarr; "
                     f"<b>{html.escape(r['target_new'])}</b></td><td class='{'pass' if e['passed'] else 'fail'}'>"
                     f"{_verdict(e)}</td><td>{html.escape('; '.join(e['reasons']))}</td></tr>")
    parts.append("</table>")
    with tempfile.TemporaryDirectory() as tmp:
        for i, e in enumerate(report["edits"]):
            r = e["request"]
            fill = r["prompt"].replace("{}", r["subject"])
            parts.append(f"<h3 id='e{i}'>{i + 1}. {html.escape(fill)} &rarr; {html.escape(r['target_new'])} "
                         f"<span class='{'pass' if e['passed'] else 'fail'}'>{_verdict(e).upper()}"
                         "</span></h3><table>")
            rows = _flow_rows(e)
            parts += [f"<tr><th>{a}</th><td>{c}</td></tr>" for a, c in rows]
            parts.append("</table>")
            if i < MAX_FIGURE_EDITS:
                parts.append(_figures(e, i, Path(tmp)))
    parts.append("</body></html>")
    return "\n".join(parts)
