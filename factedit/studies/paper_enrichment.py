"""Items 2 and 4 of the paper's study (``factedit.studies.paper``): subject enrichment.

Item 2: the attribute rate by layer and position, through the logit lens and the raw
unembedding, beside a control (another subject's related tokens), and the texts the related
tokens come from (``describe_subjects``, ``related_set``). Item 4: early against upper MLPs,
the MLP updates at the subject positions removed in the first window against the last window
below the read layer.
"""

from __future__ import annotations

import torch

from factedit.analysis.attribute_rate import related_tokens
from factedit.analysis.knockout import window_layers
from factedit.audit.summary import _mean_band
from factedit.studies.paper_record import POSITIONS, _mean, argmax

DESCRIBE_PROMPT = "Here is a short article about {}.\n\n"


@torch.no_grad()
def describe_subjects(model, tok, subjects: list[str], max_new_tokens: int = 32, batch: int = 16,
                      bar=None) -> dict[str, str]:
    """The offline default for the attribute rate's text about a subject: a short article the
    model writes itself, greedy, after ``DESCRIBE_PROMPT``. It is what the model associates
    with the subject (not necessarily true), the prompt does not end at the subject (so the
    text is not simply the last subject token's own next-token prediction), and it needs no
    download. Left-padded batches; ``bar`` (a tqdm bar, or None) hears each batch's subjects."""
    device = next(model.parameters()).device
    out: dict[str, str] = {}
    side = tok.padding_side
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    tok.padding_side = "left"
    try:
        todo = sorted(set(subjects))
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            enc = tok([DESCRIBE_PROMPT.format(s) for s in chunk], return_tensors="pt", padding=True)
            if "attention_mask" not in enc:
                enc["attention_mask"] = torch.ones_like(enc["input_ids"])
            gen = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            n = enc["input_ids"].shape[1]
            for s, row in zip(chunk, gen):
                out[s] = tok.decode(row[n:], skip_special_tokens=True)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        tok.padding_side = side
    return out


def related_set(tok, text: str | list[str], subject: str) -> set[int]:
    """The related tokens of a text (``related_tokens``), without the subject's own name tokens
    (a description repeats the name; the paper's count is about attributes)."""
    return related_tokens(tok, text) - related_tokens(tok, subject)


def enrichment_summary(records: list[dict]) -> dict | None:
    rated = [r for r in records if r.get("attribute_rate")]
    if not rated:
        return None
    out: dict = {"n": len(rated)}
    for proj in ("logit_lens", "raw"):
        out[proj] = {}
        for pos in POSITIONS:
            rows = [r["attribute_rate"][proj][pos] for r in rated if pos in r["attribute_rate"][proj]]
            if rows:
                mean = _mean_band(rows)[0]
                out[proj][pos] = {"mean": mean, "max": max(mean), "max_layer": argmax(mean), "facts": len(rows)}
    ctrl = [r["attribute_rate"]["control_last_subject"] for r in rated if "control_last_subject" in r["attribute_rate"]]
    if ctrl:
        mean = _mean_band(ctrl)[0]
        out["control_last_subject"] = {"mean": mean, "max": max(mean), "facts": len(ctrl)}
    return out


def early_mlp_summary(records: list[dict], n_layers: int) -> dict | None:
    """Item 4: MLP updates at the subject positions removed over the first window (layers
    0..w-1) against the last window that ends below the read layer."""
    if not records:
        return None
    sk0 = records[0]["sublayer_knockout"]
    w, read = sk0["window"], sk0["read_layer"]
    centres = range(n_layers)
    early = next(c for c in centres if window_layers(c, w, n_layers).start == 0
                 and window_layers(c, w, n_layers).stop == min(w, n_layers))
    below = [c for c in centres if window_layers(c, w, n_layers).stop <= read]
    upper = max(below, key=lambda c: (window_layers(c, w, n_layers).stop, c)) if below else None
    out: dict = {"n": len(records), "window": w, "read_layer": read,
                 "early_window": list(window_layers(early, w, n_layers)),
                 "upper_window": None if upper is None else list(window_layers(upper, w, n_layers))}
    rated = [r for r in records if r["sublayer_knockout"]["mlp_attribute_rate"] is not None]

    # change (%) of the mean over facts of the largest MHSA p(attribute) at the last position
    # (a ratio of means: a mean of per-fact ratios is dominated by facts with a tiny base)
    base_ext = _mean(r["sublayer_knockout"]["base_extraction"] for r in records)

    def ext_change(c):
        after = _mean(r["sublayer_knockout"]["mlp_extraction"][c] for r in records)
        return (after - base_ext) / base_ext * 100 if base_ext else None

    curves = {"extraction_change": [ext_change(c) for c in centres],
              "prob_change": [_mean(r["sublayer_knockout"]["mlp_prob_change"][c] for r in records) for c in centres]}
    if rated:
        curves["attribute_rate_drop"] = [
            _mean(r["sublayer_knockout"]["base_attribute_rate"] - r["sublayer_knockout"]["mlp_attribute_rate"][c]
                  for r in rated) for c in centres]
        out["base_attribute_rate"] = _mean(r["sublayer_knockout"]["base_attribute_rate"] for r in rated)
    out["curves"] = curves
    for name, c in (("early", early), ("upper", upper)):
        out[name] = None if c is None else {k: v[c] for k, v in curves.items()}
    return out
