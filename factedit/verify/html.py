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

METRICS = [
    ("efficacy_score", "Efficacy score (ES): new beats true on the edit prompt"),
    ("efficacy_magnitude", "Efficacy magnitude: p(new) - p(true)"),
    ("paraphrase_score", "Paraphrase score (PS)"),
    ("neighbourhood_score", "Neighbourhood score (NS): true still beats new on other subjects"),
    ("reliability_accuracy", "Reliability (token accuracy, EasyEdit-style)"),
    ("generalisation_accuracy", "Generalisation (token accuracy on paraphrases)"),
    ("locality_accuracy", "Locality (neighbour tokens unchanged)"),
    ("fluency_before", "Fluency before (n-gram entropy)"),
    ("fluency_after", "Fluency after (n-gram entropy)"),
]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def embed_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


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
        cells.append((label, k, p))
    rows = []
    for j, kind in ((1, "attention knockout"), (2, "vocabulary projection")):
        rows.append('<div class="figs">' + "".join(
            f'<figure><img src="{embed_png(c[j])}"><figcaption>{c[0]}: {kind}</figcaption></figure>' for c in cells)
            + "</div>")
    return "".join(rows)


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
             "(d) the overlap of the circuits are reported.</p>",
             "<h2>Summary (means over edits)</h2><table>"]
    for k, label in METRICS:
        if k in s:
            parts.append(f"<tr><th>{label}</th><td>{_fmt(s[k])}</td></tr>")
    parts.append("</table><h2>Edits</h2><table><tr><th>#</th><th>edit</th><th>verdict</th><th>why</th></tr>")
    for i, e in enumerate(report["edits"]):
        r = e["request"]
        fill = r["prompt"].replace("{}", r["subject"])
        parts.append(f"<tr><td><a href='#e{i}'>{i + 1}</a></td><td>{html.escape(fill)} &rarr; "
                     f"<b>{html.escape(r['target_new'])}</b></td><td class='{'pass' if e['passed'] else 'fail'}'>"
                     f"{'pass' if e['passed'] else 'fail'}</td><td>{html.escape('; '.join(e['reasons']))}</td></tr>")
    parts.append("</table>")
    with tempfile.TemporaryDirectory() as tmp:
        for i, e in enumerate(report["edits"]):
            r, f = e["request"], e["flow"]
            fill = r["prompt"].replace("{}", r["subject"])
            b = f["b_extraction"]
            parts.append(f"<h3 id='e{i}'>{i + 1}. {html.escape(fill)} &rarr; {html.escape(r['target_new'])} "
                         f"<span class='{'pass' if e['passed'] else 'fail'}'>{'PASS' if e['passed'] else 'FAIL'}"
                         "</span></h3><table>")
            rows = [
                ("(a) edited prediction", f"{f['a_prediction'].strip()} ({'ok' if f['a_ok'] else 'wrong'}); "
                 f"on paraphrases: {_fmt(f['a_paraphrases_ok'])}"),
                ("(b) new attribute extracted at", b["where"] + (
                    f"; targeted: {', '.join(b['targeted'])} "
                    f"({'hit' if b['in_targeted_components'] else 'elsewhere'})" if b["targeted"] else "")),
                ("(c) subject knockout at the read window", f"window at layer {f['c_read_window_centre']}: "
                 f"p(new) changes by {_fmt(-f['c_drop_percent'])} %; share of the edit's gain that survives: "
                 f"{_fmt(f['c_gain_surviving_knockout'])}"),
                ("(d) extraction heads Jaccard / enrichment", f"{_fmt(f['d_overlap']['extraction_heads_jaccard'])} / "
                 f"{f['d_overlap']['enrichment_before']} &rarr; {f['d_overlap']['enrichment_after']}"),
                ("(e) neighbours unchanged", _fmt(f["e_neighbours"].get("predictions_unchanged"))),
            ] + [(label, _fmt(e["metrics"].get(k))) for k, label in METRICS[:7]]
            parts += [f"<tr><th>{a}</th><td>{c}</td></tr>" for a, c in rows]
            parts.append("</table>")
            if i < MAX_FIGURE_EDITS:
                parts.append(_figures(e, i, Path(tmp)))
    parts.append("</body></html>")
    return "\n".join(parts)
