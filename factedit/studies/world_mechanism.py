"""Does the demo model recall facts through a visible circuit? The foundation's four
mechanism measures, averaged over a sample of known facts:

(a) knockout of subject -> last edges: relative change of the prediction's probability
    per window centre (top window vs lowest window);
(b) knockout of non-subject -> last edges: where along the layers it matters, against (a);
(c) attribute rate at the last subject token by layer (the subject's own attributes among
    the top-k of the logit lens), against a control (another entity's attributes);
(d) share of facts with an extraction head: a head whose output at the last position,
    projected to the vocabulary, puts the correct attribute at rank 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from factedit.analysis.attribute_rate import attribute_rate
from factedit.analysis.knockout import SOURCE_SETS, attention_knockout, strongest_layer
from factedit.analysis.projection import components, rank_and_prob
from factedit.analysis.spans import tokenize_with_subject
from factedit.models.adapter import ModelLayout
from factedit.world.generate import World


@dataclass
class MechanismReport:
    n_facts: int
    window: int
    knockout: dict[str, list[float]]  # mean relative change (%) per centre layer
    attribute_rate: list[float]  # per layer, embeddings first
    attribute_rate_control: list[float]
    extraction_head_share: float  # (d)
    top_heads: list[tuple[int, int, float]]  # (layer, head, share of facts at rank 1)
    head_share: list[list[float]]  # (L, H) share of facts where the head ranks the attribute first
    mlp_extraction_share: float
    attn_extraction_share: float

    def summary(self) -> dict:
        subj = self.knockout["subject"]
        non = self.knockout["non_subject"]
        L = len(subj)
        upper = subj[L // 2 :]
        ar = self.attribute_rate
        return {
            "n_facts": self.n_facts,
            "window": self.window,
            "a_subject_top_window": round(subj[-1], 1),
            "a_subject_strongest_upper_window": round(min(upper), 1),
            "a_subject_lowest_window": round(subj[0], 1),
            "b_non_subject_strongest_layer": strongest_layer(non),
            "b_subject_strongest_layer": strongest_layer(subj),
            "c_attribute_rate_embedding": round(ar[0], 3),
            "c_attribute_rate_max": round(max(ar), 3),
            "c_attribute_rate_max_layer": int(max(range(len(ar)), key=lambda i: ar[i])),
            "c_control_max": round(max(self.attribute_rate_control), 3),
            "d_extraction_head_share": round(self.extraction_head_share, 3),
            "attn_extraction_share": round(self.attn_extraction_share, 3),
            "mlp_extraction_share": round(self.mlp_extraction_share, 3),
        }


def sample_facts(world: World, n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(relation id, template, subject, attribute) over training templates."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        e = rng.choice(world.entities)
        rid = rng.choice(list(world.relations))
        out.append((rid, rng.choice(world.relations[rid].templates), e.name, e.facts[rid]))
    return out


@torch.no_grad()
def measure_mechanism(model, tok, world: World, n_facts: int = 100, window: int = 3,
                      top_k: int = 10, seed: int = 0) -> MechanismReport:
    adapter = ModelLayout(model)
    L, H = adapter.n_layers, adapter.n_heads
    rng = random.Random(seed + 1)
    ko = {s: torch.zeros(L) for s in SOURCE_SETS}
    ar = torch.zeros(L + 1)
    ar_ctrl = torch.zeros(L + 1)
    head_hits = torch.zeros(L, H)
    n = any_head = attn_ev = mlp_ev = 0
    for _rid, template, subject, attr in sample_facts(world, n_facts, seed):
        tp = tokenize_with_subject(tok, template, subject)
        target = tok.encode(" " + attr)[0]
        comp = components(adapter, tp.input_ids)
        if int(comp.logits.argmax()) != target:
            continue  # only facts the model knows, as in the paper
        n += 1
        res = attention_knockout(adapter, tp, window)
        for s in SOURCE_SETS:
            ko[s] += torch.tensor(res.curves.curve(s))
        ent = world.entity(subject)
        other = rng.choice([e for e in world.entities if e.name != subject])
        own = {tok.encode(" " + a)[0] for a in ent.facts.values()}
        ctrl = {tok.encode(" " + a)[0] for a in other.facts.values()} - own
        stream = comp.stream()[:, tp.last_subject]  # (L+1, d)
        ar += torch.tensor(attribute_rate(adapter, tok, stream, own, top_k))
        ar_ctrl += torch.tensor(attribute_rate(adapter, tok, stream, ctrl, top_k))
        rank_h, _ = rank_and_prob(adapter, comp.heads, target)  # (L, H)
        hits = rank_h == 1
        head_hits += hits.float()
        any_head += int(hits.any())
        attn_ev += int((rank_and_prob(adapter, comp.attn, target)[0] == 1).any())
        mlp_ev += int((rank_and_prob(adapter, comp.mlp, target)[0] == 1).any())
    if n == 0:
        raise RuntimeError("the model knows none of the sampled facts")
    share = head_hits / n
    flat = sorted(((int(i // H), int(i % H), float(share.view(-1)[i])) for i in range(L * H)),
                  key=lambda t: -t[2])
    return MechanismReport(
        n_facts=n,
        window=window,
        knockout={s: (ko[s] / n).tolist() for s in SOURCE_SETS},
        attribute_rate=(ar / n).tolist(),
        attribute_rate_control=(ar_ctrl / n).tolist(),
        extraction_head_share=any_head / n,
        top_heads=flat[:8],
        head_share=share.tolist(),
        mlp_extraction_share=mlp_ev / n,
        attn_extraction_share=attn_ev / n,
    )
