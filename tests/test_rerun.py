"""The fast path (partial reruns on the clean run's keys and values) against the naive path
(one full forward pass per intervention), on every family and on the demo model.

Tolerances: families run in float64 with the softmax kept in float64 (`fp64_softmax`), so the
two paths differ only by float64 rounding, except GPT-J, whose attention upcasts to float32
(different batch shapes sum in a different order); observed <= 3e-5 in relative change (%).
The demo model runs in float32; observed ~1e-5. Stated tolerance everywhere: 1e-4.
"""

import pytest
import torch

from factedit.analysis.knockout import SOURCE_SETS, KnockoutCurves, attention_knockout
from factedit.analysis.rerun import clean_run, clean_runs, prefix_causal_mask, rerun
from factedit.analysis.spans import TokenizedPrompt, tokenize_with_subject
from factedit.analysis.sublayer import SUBLAYERS, sublayer_knockout
from factedit.models.adapter import ModelLayout

from .families import FAMILIES, tiny_model

TOL = 1e-4
IDS = [5, 17, 23, 42, 8, 61, 3, 77]


class _Tok:
    def decode(self, ids):
        return "?"


def _max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for k in a for x, y in zip(a[k], b[k], strict=True))


def _ko_diff(a: KnockoutCurves, b: KnockoutCurves) -> float:
    return max(abs(x - y) for s in SOURCE_SETS for x, y in zip(a.curve(s), b.curve(s), strict=True))


@pytest.mark.usefixtures("fp64_softmax")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("span", [(2, 5), (0, 1), (6, 7)])
def test_fast_knockout_equals_naive(family, span):
    adapter = ModelLayout(tiny_model(family))
    tp = TokenizedPrompt("", IDS, span)
    for window in (1, 2):
        fast = attention_knockout(adapter, tp, window, target=11)
        naive = attention_knockout(adapter, tp, window, target=11, method="naive")
        assert fast.prediction == naive.prediction
        assert abs(fast.base_prob - naive.base_prob) < 1e-9
        assert _ko_diff(fast.curves, naive.curves) < TOL
        assert _ko_diff(fast.target_curves, naive.target_curves) < TOL


@pytest.mark.usefixtures("fp64_softmax")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("span", [(2, 5), (0, 2), (6, 7)])
def test_fast_sublayer_knockout_equals_naive(family, span):
    adapter = ModelLayout(tiny_model(family))
    tp = TokenizedPrompt("", IDS, span)
    fast = sublayer_knockout(adapter, _Tok(), tp, 2, 11, related={1, 2, 3}, read_layer=2, top_k=5)
    naive = sublayer_knockout(adapter, _Tok(), tp, 2, 11, related={1, 2, 3}, read_layer=2, top_k=5,
                              method="naive")
    for field in ("prob_change", "extraction", "attribute_rate"):
        assert _max_diff(getattr(fast, field), getattr(naive, field)) < TOL, field
    assert abs(fast.base_extraction - naive.base_extraction) < 1e-9


def test_demo_fast_paths_equal_naive(demo):
    model, tok, world = demo
    adapter = ModelLayout(model)
    for ent in world.entities[:3]:
        _rid, prompt, _attr = world.prompts(ent)[0]
        tp = tokenize_with_subject(tok, prompt, ent.name)
        fast = attention_knockout(adapter, tp, 3)
        naive = attention_knockout(adapter, tp, 3, method="naive")
        assert fast.prediction == naive.prediction
        assert _ko_diff(fast.curves, naive.curves) < TOL
        fs = sublayer_knockout(adapter, tok, tp, 1, fast.prediction, related={5, 6, 7}, top_k=10)
        ns = sublayer_knockout(adapter, tok, tp, 1, fast.prediction, related={5, 6, 7}, top_k=10, method="naive")
        for field in ("prob_change", "extraction", "attribute_rate"):
            assert _max_diff(getattr(fs, field), getattr(ns, field)) < TOL, field


@pytest.mark.usefixtures("fp64_norms")
@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gemma3_text", "gemma2"])
def test_rerun_without_intervention_reproduces_the_clean_run(family):
    """Rows started at any layer, on any suffix of positions, with plain causal masks (within
    each layer's sliding window), give back the clean logits (checks the kept keys/values, all
    of them in sliding layers too, positions and row bookkeeping). The Gemma configs slide over
    fewer positions than the prompt has."""
    adapter = ModelLayout(tiny_model(family))
    clean = clean_run(adapter, IDS)
    T = len(IDS)
    assert all(k.shape[-2] == T for k in clean.keys)
    for start in (0, 3, T - 1):
        out = rerun(adapter, clean, start, [0, 1, 2, 2, 1],
                    masks=lambda la, rows, s=start: prefix_causal_mask(len(rows), s, T, torch.float32, "cpu",
                                                                       adapter.attn_window(la)),
                    keep_stream=[(2, T - 1), (1, 0)], keep_attn_last=True)
        assert torch.allclose(out.logits, clean.logits.expand(5, -1), atol=1e-9)
        assert torch.allclose(out.stream[(2, T - 1)], clean.block_in[2][T - 1].expand(5, -1), atol=1e-9)
        assert torch.allclose(out.attn_last[:, 1], clean.attn[1][-1].expand(5, -1), atol=1e-9)


def test_source_sets_and_sublayers_are_what_the_rows_cover():
    assert SOURCE_SETS == ("subject", "non_subject", "last") and SUBLAYERS == ("mlp", "attn")


def test_rerun_keeps_a_forward_set_on_the_instance():
    """accelerate's device_map hooks replace a block's forward on the instance; a rerun must
    leave such a wrapper in place."""
    adapter = ModelLayout(tiny_model("gpt2"))
    block = adapter.block(1)
    calls = []
    plain = block.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return plain(*args, **kwargs)

    block.forward = wrapped
    clean = clean_run(adapter, IDS)
    attention_knockout(adapter, TokenizedPrompt("", IDS, (2, 5)), 1, clean=clean)
    assert block.__dict__["forward"] is wrapped
    n = len(calls)
    clean_run(adapter, IDS)
    assert len(calls) == n + 1


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "gemma3_text"])
def test_batched_clean_runs_equal_one_at_a_time(family):
    """Prompts of one length share a pass, without padding: every kept state and the logits are
    those of the prompt's own pass, up to float32 rounding (one thread, as in the audit; stated
    tolerance 1e-5). Whether they are bit for bit depends on the CPU's kernels: the BLAS library
    and ATen choose their summation order by shape and instruction set. On an AMD EPYC with
    AVX-512 they were bit for bit except Gemma-3, whose attention core takes another path for a
    batch of one (observed 2e-6)."""
    adapter = ModelLayout(tiny_model(family, dtype=torch.float32))
    prompts = [IDS, IDS[::-1], IDS[2:], [9, 4, 4, 2, 1, 8, 30, 11], IDS[1:], [3, 1, 4, 1, 5]]
    tol = 1e-5

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a - b).abs().max() <= tol)

    with torch.no_grad():
        batched = clean_runs(adapter, prompts)
        for ids, got in zip(prompts, batched, strict=True):
            want = clean_run(adapter, ids)
            assert got.input_ids == ids
            for field in ("block_in", "keys", "values", "attn", "mlp", "z", "attn_in", "attn_gain"):
                a, b = getattr(got, field), getattr(want, field)
                assert (a is None) == (b is None)
                assert a is None or all(same(x, y) for x, y in zip(a, b, strict=True)), field
            assert same(got.logits, want.logits)
            assert got.attn_pattern is None or same(got.attn_pattern, want.attn_pattern)
