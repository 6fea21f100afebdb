"""Projections computed only as far as needed (factedit.analysis.vocab) against projecting
every vector in full: the probability bound never falls below the exact value, and the pruned
group maxima equal the full ones (float64; stated tolerance 1e-12)."""

import pytest
import torch

from factedit.analysis.vocab import max_token_prob, prob_upper_bounds, token_prob
from factedit.models.adapter import ModelLayout

from .families import FAMILIES, tiny_model


@pytest.mark.usefixtures("fp64_norms")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [2, 16])
def test_pruned_group_maxima_equal_full_projection(family, k):
    adapter = ModelLayout(tiny_model(family))
    d = adapter.d_model
    g = torch.Generator().manual_seed(k)
    refs = torch.randn(3, d, generator=g, dtype=torch.float64) * 2  # 3 reference vectors
    ref_logits = adapter.logit_lens(refs)  # (3, V)
    ref = torch.randint(0, 3, (40,), generator=g)
    # candidates near their reference (the knockout case) and far from it
    scale = torch.where(torch.arange(40) < 30, 0.1, 3.0).double()[:, None]
    vecs = refs[ref] + scale * torch.randn(40, d, generator=g, dtype=torch.float64)
    group = torch.randint(0, 6, (40,), generator=g)
    group[:6] = torch.arange(6)
    token = 7
    with torch.no_grad():
        exact = token_prob(adapter, vecs, token).double()
        bound = prob_upper_bounds(adapter, ref_logits, vecs, ref, token, k=k).double()
    assert (bound >= exact * (1 - 1e-12)).all()
    for floor_value in (float("-inf"), float(exact.median())):
        floor = torch.full((6,), floor_value, dtype=torch.float64)
        got = max_token_prob(adapter, ref_logits, vecs, ref, group, floor, token, k=k)
        want = torch.maximum(floor, torch.full((6,), float("-inf"), dtype=torch.float64)
                             .scatter_reduce(0, group, exact, reduce="amax"))
        assert torch.allclose(got, want, rtol=1e-12, atol=0), (got, want)


@pytest.mark.usefixtures("fp64_norms")
@pytest.mark.parametrize("family", FAMILIES)
def test_screened_heads_keep_every_extraction_head(family):
    """Heads ruled out by the screening rank the token below max_rank; the others get the full
    projection's rank and probability (few candidate tokens, so that the screening decides)."""
    from factedit.analysis.heads import extraction_head_scores, head_scores
    from factedit.analysis.projection import components

    from .test_families import IDS

    adapter = ModelLayout(tiny_model(family))
    with torch.no_grad():
        comp = components(adapter, IDS)
        refs = torch.cat([adapter.logit_lens(comp.attn), comp.logits[None]])
        for token in (3, int(comp.logits.argmax())):
            full = head_scores(adapter, comp, token)
            for max_rank, k in ((1, 2), (3, 8)):
                got = extraction_head_scores(adapter, comp, token, True, max_rank, refs, k=k)
                kept = got.rank >= 1
                assert torch.equal(got.rank[kept], full.rank[kept])
                assert torch.allclose(got.prob[kept], full.prob[kept], rtol=1e-12, atol=0)
                assert (full.rank[~kept] > max_rank).all()
                assert ((full.rank <= max_rank) <= kept).all()


def test_audit_circuit_equals_the_whole_circuit(demo):
    """locate as the audit runs it (no sublayer extraction curves, only extraction heads ranked)
    gives the same numbers as the whole circuit for everything it keeps."""
    from factedit.analysis.locate import locate

    model, tok, world = demo
    ent = world.entities[2]
    _rid, prompt, _attr = world.prompts(ent)[0]
    whole = locate(prompt, ent.name, model=model, tokenizer=tok).to_dict()
    lean = locate(prompt, ent.name, model=model, tokenizer=tok, extraction=False, heads="extraction").to_dict()
    assert lean["head_rank"] is None and lean["head_prob"] is None
    for k in ("mlp", "attn"):
        assert lean["sublayer_knockout"][k]["extraction"] is None
        lean["sublayer_knockout"][k]["extraction"] = whole["sublayer_knockout"][k]["extraction"]
    assert lean["sublayer_knockout"]["base_extraction"] is None
    lean["sublayer_knockout"]["base_extraction"] = whole["sublayer_knockout"]["base_extraction"]
    lean["head_rank"], lean["head_prob"] = whole["head_rank"], whole["head_prob"]
    assert lean == whole
