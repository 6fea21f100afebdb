"""Every supported family: adapter lookup, per-head decomposition and attention knockout
against a naive reference (one forward per intervention, blocking by post-softmax
renormalisation instead of factedit's pre-softmax masking)."""

from contextlib import contextmanager

import pytest
import torch

from factedit.analysis.knockout import SOURCE_SETS, attention_knockout, source_positions, window_layers
from factedit.analysis.projection import components
from factedit.analysis.spans import TokenizedPrompt
from factedit.models.adapter import ModelAdapter, UnsupportedModelError, family_for

from .families import FAMILIES, tiny_model

IDS = [5, 17, 23, 42, 8, 61, 3, 77]

# The models run in float64 (softmax included, see the `fp64_softmax` fixture), so the batched
# interventions and the one-row references differ only by float64 rounding. Stated tolerance:
# 1e-4 in relative change (%), as the issue asks; observed ~1e-10.
TOL = 1e-4
SPAN = (2, 5)


@contextmanager
def renormalised_softmax(adapter, layers, q, sources):
    """While the attention modules of ``layers`` run, zero the softmax weights of the edges
    q -> sources and renormalise the row: the naive way to cut those edges."""
    orig = torch.nn.functional.softmax
    state = {"on": False}

    def patched(x, dim=None, **k):
        p = orig(x, dim=dim, **k)
        if not state["on"]:
            return p
        p = p.clone()
        p[..., q, sources] = 0
        return p / p[..., q : q + 1, :].sum(-1, keepdim=True).where(
            torch.arange(p.shape[-2], device=p.device).view(-1, 1) == q, torch.ones((), dtype=p.dtype))

    hs = []
    for la in layers:
        mod = adapter.attn(la)
        hs.append(mod.register_forward_pre_hook(lambda m, a: state.update(on=True)))
        hs.append(mod.register_forward_hook(lambda m, a, o: state.update(on=False)))
    torch.nn.functional.softmax = patched
    try:
        yield
    finally:
        torch.nn.functional.softmax = orig
        for h in hs:
            h.remove()


def test_unknown_family_lists_supported():
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama"):
        family_for("mamba")


@pytest.mark.usefixtures("fp64_softmax")
@pytest.mark.parametrize("family", FAMILIES)
def test_knockout_matches_naive_reference(family):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    tp = TokenizedPrompt("", IDS, SPAN)
    window = 2
    res = attention_knockout(adapter, tp, window, target=11)
    src = source_positions(tp)
    q = tp.last
    with torch.no_grad():
        p0 = model(input_ids=torch.tensor([IDS])).logits[0, -1].softmax(-1)
        assert int(p0.argmax()) == res.prediction
        worst = 0.0
        for s in SOURCE_SETS:
            for c in range(adapter.n_layers):
                layers = list(window_layers(c, window, adapter.n_layers))
                with renormalised_softmax(adapter, layers, q, src[s]):
                    p = model(input_ids=torch.tensor([IDS])).logits[0, -1].softmax(-1)
                want = (float(p[res.prediction]) / float(p0[res.prediction]) - 1) * 100
                want_t = (float(p[11]) / float(p0[11]) - 1) * 100
                worst = max(worst, abs(res.curves[s][c] - want), abs(res.target_curves[s][c] - want_t))
    assert worst < TOL, worst
    assert max(abs(v) for s in SOURCE_SETS for v in res.curves[s]) > 1e-2  # the knockout did something


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_sum_to_mhsa_output(family):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    comp = components(adapter, IDS)
    for layer in range(adapter.n_layers):
        bias = adapter.attn_out_bias(layer)
        summed = comp.heads[layer].sum(0) + (bias if bias is not None else 0)
        torch.testing.assert_close(summed, comp.attn[layer], atol=1e-10, rtol=0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits[0, -1]
    torch.testing.assert_close(comp.logits, logits, atol=1e-10, rtol=0)
    # the logit lens of the last residual is the model's own output
    torch.testing.assert_close(adapter.logit_lens(comp.resid[-1, -1]), logits, atol=1e-8, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_is_sum_of_sublayer_outputs(family):
    """What `components` records as the MHSA and MLP outputs at the last position are exactly
    the updates the residual stream receives (sequential and parallel blocks alike)."""
    model = tiny_model(family)
    comp = components(ModelAdapter(model), IDS)
    stream = comp.stream()[:, -1]  # (L+1, d)
    torch.testing.assert_close(stream[1:] - stream[:-1], comp.attn + comp.mlp, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_pattern_of_last_position(family):
    model = tiny_model(family)
    comp = components(ModelAdapter(model), IDS)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([IDS]), output_attentions=True)
    want = torch.stack([a[0, :, -1] for a in out.attentions])  # (L, H, T)
    torch.testing.assert_close(comp.attn_pattern, want, atol=1e-12, rtol=0)
    ones = torch.ones_like(comp.attn_pattern[..., 0])
    torch.testing.assert_close(comp.attn_pattern.sum(-1), ones, atol=1e-6, rtol=0)  # fp32 softmax
