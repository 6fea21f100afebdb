"""Knockout, projection and per-head outputs against the naive GPT-2 reference."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from factedit.analysis.knockout import SOURCE_SETS, attention_knockout, source_positions, window_layers
from factedit.analysis.projection import components
from factedit.analysis.spans import TokenizedPrompt
from factedit.models.adapter import ModelLayout

from . import naive_gpt2


def tiny_gpt2(layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=layers, n_head=4,
                     attn_implementation="eager")
    return GPT2LMHeadModel(cfg).double().eval()


@pytest.mark.parametrize("k,L,expected", [
    (9, 48, {0: range(0, 5), 20: range(16, 25), 47: range(43, 48)}),
    (4, 8, {0: range(0, 3), 3: range(2, 6), 7: range(6, 8)}),
    (1, 6, {2: range(2, 3)}),
])
def test_window_layers(k, L, expected):
    for c, r in expected.items():
        assert window_layers(c, k, L) == r


@pytest.mark.parametrize("window", [1, 2, 3])
def test_knockout_matches_naive_reference(window):
    model = tiny_gpt2()
    adapter = ModelLayout(model)
    ids = [5, 17, 23, 42, 8, 61, 3, 77]
    tp = TokenizedPrompt("", ids, (2, 5))
    res = attention_knockout(adapter, tp, window, target=11)
    with torch.no_grad():
        p0 = naive_gpt2.forward(model, ids)[-1].softmax(-1)
        pred = int(p0.argmax())
        assert pred == res.prediction
        src = source_positions(tp)
        for s in SOURCE_SETS:
            for c in range(adapter.n_layers):
                blocked = {la: src[s] for la in window_layers(c, window, adapter.n_layers)}
                p = naive_gpt2.forward(model, ids, blocked)[-1].softmax(-1)
                want = (float(p[pred]) - float(p0[pred])) / float(p0[pred]) * 100
                want_t = (float(p[11]) - float(p0[11])) / float(p0[11]) * 100
                assert res.curves.curve(s)[c] == pytest.approx(want, abs=1e-4)
                assert res.target_curves.curve(s)[c] == pytest.approx(want_t, abs=1e-4)
    # the intervention must actually change something
    assert max(abs(v) for v in res.curves.subject) > 1e-3


def test_components_match_naive_and_heads_sum_to_mhsa():
    model = tiny_gpt2()
    adapter = ModelLayout(model)
    ids = [5, 17, 23, 42, 8, 61]
    comp = components(adapter, ids)
    rec: dict = {}
    with torch.no_grad():
        logits = naive_gpt2.forward(model, ids, record=rec)
    torch.testing.assert_close(comp.logits, logits[-1], atol=1e-10, rtol=0)
    for layer in range(adapter.n_layers):
        torch.testing.assert_close(comp.attn[layer], rec["attn"][layer], atol=1e-10, rtol=0)
        torch.testing.assert_close(comp.mlp[layer], rec["mlp"][layer], atol=1e-10, rtol=0)
        torch.testing.assert_close(comp.resid[layer], rec["resid"][layer], atol=1e-10, rtol=0)
        # heads' outputs plus the output bias sum to the MHSA output
        summed = comp.heads[layer].sum(0) + adapter.attn_out_bias(layer)
        torch.testing.assert_close(summed, comp.attn[layer], atol=1e-10, rtol=0)
        # and each head is its own slice of the naive computation
        z = rec["z"][layer].view(adapter.n_heads, adapter.head_dim)
        w = model.transformer.h[layer].attn.c_proj.weight  # (in, out)
        for h in range(adapter.n_heads):
            want = z[h] @ w[h * adapter.head_dim:(h + 1) * adapter.head_dim]
            torch.testing.assert_close(comp.heads[layer, h], want, atol=1e-10, rtol=0)


def test_knockout_on_the_demo_model_matches_naive_reference(demo):
    from factedit.analysis.spans import tokenize_with_subject

    model, tok, world = demo
    model = type(model)(model.config).double().eval()
    model.load_state_dict({k: v.double() for k, v in demo[0].state_dict().items()})
    adapter = ModelLayout(model)
    e = world.entities[0]
    tp = tokenize_with_subject(tok, world.relations["birthplace"].templates[1], e.name)
    res = attention_knockout(adapter, tp, 3)
    src = source_positions(tp)
    with torch.no_grad():
        p0 = naive_gpt2.forward(model, tp.input_ids)[-1].softmax(-1)
        for s in SOURCE_SETS:
            for c in range(adapter.n_layers):
                blocked = {la: src[s] for la in window_layers(c, 3, adapter.n_layers)}
                p = naive_gpt2.forward(model, tp.input_ids, blocked)[-1].softmax(-1)
                want = (float(p[res.prediction]) / float(p0[res.prediction]) - 1) * 100
                assert res.curves.curve(s)[c] == pytest.approx(want, abs=1e-4)
