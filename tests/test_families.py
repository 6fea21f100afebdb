"""Every supported family: adapter lookup, per-head decomposition and attention knockout
against a naive reference (one forward per intervention, blocking by post-softmax
renormalisation instead of factedit's pre-softmax masking)."""

from contextlib import contextmanager

import pytest
import torch

from factedit.analysis.heads import ov_vectors
from factedit.analysis.hooks import attention_masks, causal_mask, padding_safe
from factedit.analysis.knockout import SOURCE_SETS, attention_knockout, source_positions, window_layers
from factedit.analysis.projection import components
from factedit.analysis.spans import TokenizedPrompt
from factedit.models.adapter import ModelLayout, UnsupportedModelError, family_for

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


def test_the_former_name_is_the_same_class_with_a_warning():
    import factedit.models.adapter as adapter

    with pytest.warns(DeprecationWarning, match="ModelAdapter is deprecated: use ModelLayout"):
        assert adapter.ModelAdapter is ModelLayout
    with pytest.raises(AttributeError):
        adapter.NoSuchName  # noqa: B018


@pytest.mark.usefixtures("fp64_softmax")
@pytest.mark.parametrize("family", FAMILIES)
def test_knockout_matches_naive_reference(family):
    model = tiny_model(family)
    adapter = ModelLayout(model)
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
                worst = max(worst, abs(res.curves.curve(s)[c] - want),
                            abs(res.target_curves.curve(s)[c] - want_t))
    assert worst < TOL, worst
    assert max(abs(v) for s in SOURCE_SETS for v in res.curves.curve(s)) > 1e-2  # the knockout did something


@pytest.mark.usefixtures("fp64_norms")
@pytest.mark.parametrize("family", FAMILIES)
def test_heads_sum_to_mhsa_output(family):
    model = tiny_model(family)
    adapter = ModelLayout(model)
    comp = components(adapter, IDS)
    for layer in range(adapter.n_layers):
        bias = adapter.attn_out_bias(layer)
        if adapter.post_norm("attn", layer) is None:  # the bias as it is; scaled by the post-norm's gain otherwise
            torch.testing.assert_close(comp.head_bias[layer], bias if bias is not None else torch.zeros_like(
                comp.head_bias[layer]), atol=0, rtol=0)
        summed = comp.heads[layer].sum(0) + comp.head_bias[layer]
        torch.testing.assert_close(summed, comp.attn[layer], atol=1e-10, rtol=0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits[0, -1]
    torch.testing.assert_close(comp.logits, logits, atol=1e-10, rtol=0)
    # the logit lens of the last residual is the model's own output (softcapping included)
    torch.testing.assert_close(adapter.logit_lens(comp.resid[-1, -1]), logits, atol=1e-8, rtol=0)


# Where the residual stream stands after the MHSA add, read without factedit's adapter: the
# input of the module that normalises it for the MLP (sequential blocks). Parallel blocks
# (GPT-J, GPT-NeoX, Phi) add both sublayers at once: there MHSA's share is the block's update
# minus the MLP module's output.
AFTER_ATTN = {"gpt2": "ln_2", "opt": "final_layer_norm", "gemma2": "pre_feedforward_layernorm",
              "gemma3_text": "pre_feedforward_layernorm", **{f: "post_attention_layernorm" for f in
                                                            ("llama", "mistral", "qwen2", "gemma")}}
PARALLEL = ("gptj", "gpt_neox", "phi")


@pytest.mark.usefixtures("fp64_norms")
@pytest.mark.parametrize("family", FAMILIES)
def test_heads_sum_to_what_the_residual_receives_from_mhsa(family):
    """The per-head outputs (plus the output bias), under factedit's definition (post-norm
    gain frozen at the whole sublayer output), add up to the block's actual residual update from
    MHSA at the last position. float64 throughout (`fp64_norms`): stated tolerance 1e-10."""
    assert set(AFTER_ATTN) | set(PARALLEL) == set(FAMILIES)
    model = tiny_model(family)
    adapter = ModelLayout(model)
    comp = components(adapter, IDS)
    got: dict[str, list] = {"in": [], "mid": [], "out": [], "mlp": []}
    hooks = []
    for la in range(adapter.n_layers):
        block = adapter.block(la)
        hooks.append(block.register_forward_pre_hook(
            lambda m, a, kw: got["in"].append((a[0] if a else kw["hidden_states"])[0, -1]), with_kwargs=True))
        hooks.append(block.register_forward_hook(
            lambda m, a, o: got["out"].append((o[0] if isinstance(o, tuple) else o)[0, -1])))
        if family in PARALLEL:
            hooks.append(block.mlp.register_forward_hook(lambda m, a, o: got["mlp"].append(o[0, -1])))
        else:
            hooks.append(block.get_submodule(AFTER_ATTN[family]).register_forward_pre_hook(
                lambda m, a: got["mid"].append(a[0].reshape(-1, a[0].shape[-1])[-1])))
    with torch.no_grad():
        model(input_ids=torch.tensor([IDS]))
    for h in hooks:
        h.remove()
    for la in range(adapter.n_layers):
        if family in PARALLEL:
            want = got["out"][la] - got["in"][la] - got["mlp"][la]
        else:
            want = got["mid"][la] - got["in"][la]
        summed = comp.heads[la].sum(0) + comp.head_bias[la]
        torch.testing.assert_close(summed, want, atol=1e-10, rtol=0)
        assert float(want.norm()) > 1e-3  # not vacuous


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_is_sum_of_sublayer_outputs(family):
    """What `components` records as the MHSA and MLP outputs at the last position are exactly
    the updates the residual stream receives (sequential and parallel blocks alike)."""
    model = tiny_model(family)
    comp = components(ModelLayout(model), IDS)
    stream = comp.stream()[:, -1]  # (L+1, d)
    torch.testing.assert_close(stream[1:] - stream[:-1], comp.attn + comp.mlp, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_pattern_of_last_position(family):
    model = tiny_model(family)
    comp = components(ModelLayout(model), IDS)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([IDS]), output_attentions=True)
    want = torch.stack([a[0, :, -1] for a in out.attentions])  # (L, H, T)
    torch.testing.assert_close(comp.attn_pattern, want, atol=1e-12, rtol=0)
    ones = torch.ones_like(comp.attn_pattern[..., 0])
    torch.testing.assert_close(comp.attn_pattern.sum(-1), ones, atol=1e-6, rtol=0)  # fp32 softmax


@pytest.mark.usefixtures("fp64_norms")
@pytest.mark.parametrize("family", ["gemma3_text", "gemma2"])
def test_ov_check_under_a_post_norm_equals_a_naive_computation(family):
    """The OV check's vector of a post-norm family: the head's value of the subject's last
    token through its slice of o_proj, times the post-attention norm's scale frozen at the last
    position's clean o_proj output, rsqrt(mean(a^2) + eps) * (1 + w), written out here from
    the raw weights. float64 (`fp64_norms`): stated tolerance 1e-10."""
    model = tiny_model(family)
    adapter = ModelLayout(model)
    comp = components(adapter, IDS)
    s_last = SPAN[1] - 1
    H, n_kv, dh = adapter.n_heads, adapter.n_kv_heads, adapter.head_dim
    layers = model.model.layers
    out, x = {}, {}  # per layer: o_proj's output at the last position, the attention input at the subject
    hooks = []
    for la in range(adapter.n_layers):
        hooks.append(layers[la].self_attn.o_proj.register_forward_hook(
            lambda m, args, o, la=la: out.update({la: o[0, -1]})))
        hooks.append(layers[la].self_attn.register_forward_pre_hook(
            lambda m, args, kw, la=la: x.update({la: kw["hidden_states"][0, s_last]}), with_kwargs=True))
    with torch.no_grad():
        model(input_ids=torch.tensor([IDS]))
    for h in hooks:
        h.remove()
    for layer in range(adapter.n_layers):
        attn, norm = layers[layer].self_attn, layers[layer].post_attention_layernorm
        a = out[layer]
        scale = (a.pow(2).mean() + norm.eps).rsqrt() * (1 + norm.weight)
        heads = [(layer, h) for h in range(H)]
        ov = ov_vectors(adapter, comp, s_last, heads)  # (H, d)
        for h in range(H):
            kv = h // (H // n_kv)
            v = attn.v_proj.weight[kv * dh : (kv + 1) * dh] @ x[layer]  # (dh,)
            want = (attn.o_proj.weight[:, h * dh : (h + 1) * dh] @ v) * scale
            torch.testing.assert_close(ov[h], want, atol=1e-10, rtol=0)
        assert not torch.allclose(ov, adapter.head_ov(layer, x[layer]), atol=1e-3)  # the gain matters


@pytest.mark.parametrize("family", FAMILIES)
def test_factedit_masks_reproduce_the_models_own_attention(family):
    """factedit replaces every attention module's mask by its own (B, 1, T, T) mask: causal,
    and for a sliding layer only the last ``window`` positions. With no intervention the
    model's output must not change. The Gemma configs slide over 3-4 positions of an 8-token
    prompt, so a plain causal mask there gives other logits (checked, so the test can fail)."""
    model = tiny_model(family)
    adapter = ModelLayout(model)
    ids = torch.tensor([IDS])
    T = len(IDS)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with attention_masks(adapter, lambda la: causal_mask(1, T, torch.float32, "cpu", adapter.attn_window(la))):
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
        windows = [adapter.attn_window(la) for la in range(adapter.n_layers)]
        if any(w is not None and w < T for w in windows):
            with attention_masks(adapter, lambda la: causal_mask(1, T, torch.float32, "cpu")):
                plain = model(input_ids=ids).logits
            assert float((plain - want).abs().max()) > 1e-4
    expected = {"gemma3_text": [4, None, 4], "gemma2": [None, 3, 3], "mistral": [4096] * 3}
    assert windows == expected.get(family, [None] * 3)


@pytest.mark.usefixtures("fp64_softmax")
@pytest.mark.parametrize("family", FAMILIES)
def test_right_padded_batches_match_single_rows(family):
    """A right-padded batch under `padding_safe` gives each row's real tokens the logits of that
    row alone (the Gemma configs' windows are shorter than the rows). float64 throughout
    (`fp64_softmax`): stated tolerance 1e-10; GPT-J, whose attention computes in float32
    (batch shapes then round differently), 1e-6."""
    model = tiny_model(family)
    adapter = ModelLayout(model)
    rows = [IDS, IDS[:2], IDS[3:6]]
    ids = torch.zeros(len(rows), len(IDS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    with torch.no_grad():
        with padding_safe(adapter, mask):
            batch = model(input_ids=ids, attention_mask=mask).logits
        for b, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r])).logits[0]
            torch.testing.assert_close(batch[b, : len(r)], alone, atol=1e-6 if family == "gptj" else 1e-10, rtol=0)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2"])
def test_padding_safe_keeps_float64_sliding_layers_finite(family):
    """The model's own masks leave a padding query far after its row's end with no visible key
    in a sliding layer. A float64 model's eager attention takes its softmax in float32, where
    the float64 mask minimum is -inf: NaN there, which reaches the real tokens through the next
    layer's values. `padding_safe` lets every query see itself."""
    model = tiny_model(family)
    ids = torch.tensor([IDS, IDS[:2] + [0] * 6])
    mask = (torch.arange(8)[None] < torch.tensor([[8], [2]])).long()
    with torch.no_grad():
        assert torch.isnan(model(input_ids=ids, attention_mask=mask).logits[1, :2]).any()
        with padding_safe(ModelLayout(model), mask):
            assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()
