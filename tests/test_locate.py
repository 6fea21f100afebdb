"""Locate: sublayer knockout, head OV check, attribute rate and the whole RecallCircuit,
against naive references written here (one plain forward pass per intervention)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from factedit.analysis.attribute_rate import keep_token, related_tokens
from factedit.analysis.circuit import CircuitError, LocateConfig, RecallCircuit
from factedit.analysis.knockout import (
    KnockoutCurves,
    attention_knockout,
    source_positions,
    strongest_layer,
    window_layers,
)
from factedit.analysis.locate import locate
from factedit.analysis.projection import components
from factedit.analysis.spans import PromptError, TokenizedPrompt, target_token_ids, tokenize_with_subject
from factedit.analysis.sublayer import SUBLAYERS, SublayerKnockoutResult, sublayer_knockout
from factedit.analysis.trace import TraceResult
from factedit.editing.config import EditConfig
from factedit.editing.values import context_prefixes
from factedit.errors import FactEditError
from factedit.integrity import sha256_json
from factedit.io import dumps_json
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint

from . import naive_gpt2
from .families import FAMILIES, tiny_model
from .test_families import IDS, SPAN, TOL, renormalised_softmax


class AllTokensKept:
    """A stand-in tokenizer for random models: every id decodes to a kept word."""

    def decode(self, ids):
        return f"word{ids[0]}"


def naive_top(model, vec, k, tok):
    """Top-k kept tokens of ln_f + lm_head, written out for GPT-2."""
    logits = model.lm_head(model.transformer.ln_f(vec))
    order = torch.sort(logits, descending=True).indices.tolist()
    return [i for i in order if keep_token(tok.decode([i]))][:k]


@pytest.fixture(scope="module")
def demo64(demo):
    model, tok, world = demo
    return copy.deepcopy(model).double(), tok, world


def demo_fact(world, i=3, rid="birthplace"):
    e = world.entities[i]
    return world.relations[rid].templates[0], e.name, e.facts[rid], e


# ---- sublayer knockout -------------------------------------------------------------------

def test_sublayer_knockout_matches_naive_gpt2_on_demo(demo64):
    model, tok, world = demo64
    adapter = ModelLayout(model)
    template, name, attr, ent = demo_fact(world)
    tp = tokenize_with_subject(tok, template, name)
    token = tok.encode(" " + attr)[0]
    related = related_tokens(tok, list(ent.facts.values()))
    k, read, window = 10, 5, 2
    res = sublayer_knockout(adapter, tok, tp, window, token, related, read_layer=read, top_k=k)
    subject = list(range(*tp.subject_span))
    with torch.no_grad():
        rec0: dict = {}
        p0 = naive_gpt2.forward(model, tp.input_ids, record=rec0)[-1].softmax(-1)[token]
        assert res.base_prob == pytest.approx(float(p0), abs=1e-12)
        for kind in SUBLAYERS:
            for c in range(adapter.n_layers):
                rec: dict = {}
                layers = set(window_layers(c, window, adapter.n_layers))
                p = naive_gpt2.forward(model, tp.input_ids, record=rec, removed={kind: layers},
                                       removed_at=subject)[-1].softmax(-1)[token]
                assert res.prob_change[kind][c] == pytest.approx((float(p) / float(p0) - 1) * 100, abs=1e-6)
                stream = [rec["embed"]] + rec["resid"]
                top = naive_top(model, stream[read][tp.last_subject], k, tok)
                assert res.attribute_rate[kind][c] == sum(t in related for t in top) / k
                ext = max(float(model.lm_head(model.transformer.ln_f(a)).softmax(-1)[token]) for a in rec["attn"])
                assert res.extraction[kind][c] == pytest.approx(ext, abs=1e-10)
    # removing early MLP updates at the subject costs enrichment on this model
    assert min(res.attribute_rate["mlp"]) < res.base_attribute_rate


@pytest.mark.usefixtures("fp64_softmax")
@pytest.mark.parametrize("family", FAMILIES)
def test_sublayer_knockout_matches_hooked_forward(family):
    model = tiny_model(family)
    adapter = ModelLayout(model)
    tp = TokenizedPrompt("", IDS, SPAN)
    token, window = 11, 2
    res = sublayer_knockout(adapter, AllTokensKept(), tp, window, token, related={1, 2, 3}, read_layer=2, top_k=5)
    getters = {"mlp": adapter.mlp, "attn": adapter.attn}
    ids = torch.tensor([IDS])
    worst = 0.0
    with torch.no_grad():
        p0 = model(input_ids=ids).logits[0, -1].softmax(-1)[token]
        for kind in SUBLAYERS:
            for c in range(adapter.n_layers):
                def zero(m, a, out):
                    o = out[0] if isinstance(out, tuple) else out
                    if o.dim() == 2:  # OPT's MLP runs on (T, d)
                        o[SPAN[0] : SPAN[1]] = 0.0
                    else:
                        o[:, SPAN[0] : SPAN[1]] = 0.0  # in place, on this single row
                hs = [getters[kind](la).register_forward_hook(zero)
                      for la in window_layers(c, window, adapter.n_layers)]
                p = model(input_ids=ids).logits[0, -1].softmax(-1)[token]
                for h in hs:
                    h.remove()
                worst = max(worst, abs(res.prob_change[kind][c] - (float(p) / float(p0) - 1) * 100))
    assert worst < TOL, worst
    assert max(abs(v) for k in SUBLAYERS for v in res.prob_change[k]) > 1e-3


# ---- heads -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_head_ov_equals_head_attending_only_to_the_subject(family):
    """The OV check's vector is exactly what the head writes at the last position when its
    attention there is forced onto the last subject token alone."""
    model = tiny_model(family)
    adapter = ModelLayout(model)
    comp = components(adapter, IDS)
    s_last, q = SPAN[1] - 1, len(IDS) - 1
    others = [i for i in range(q + 1) if i != s_last]
    # a layer whose attention reaches the subject (Gemma's sliding layers may not)
    layer = next(la for la in (1, 0, 2) if (adapter.attn_window(la) or q + 1) > q - s_last)
    z = {}
    hook = adapter.attn_out(layer).register_forward_pre_hook(lambda m, a: z.update(v=a[0][0, q].clone()))
    with torch.no_grad(), renormalised_softmax(adapter, [layer], q, others):
        model(input_ids=torch.tensor([IDS]))
    hook.remove()
    out_proj = adapter.attn_out(layer)
    bias = out_proj.bias if out_proj.bias is not None else 0
    ov = adapter.head_ov(layer, comp.attn_in[layer, s_last])  # (H, d)
    dh = adapter.head_dim
    for h in range(adapter.n_heads):
        zh = torch.zeros_like(z["v"])
        zh[h * dh : (h + 1) * dh] = z["v"][h * dh : (h + 1) * dh]
        with torch.no_grad():
            want = out_proj(zh[None])[0] - bias
        torch.testing.assert_close(ov[h], want, atol=1e-9, rtol=1e-6)


# ---- attribute rate ---------------------------------------------------------------------

def test_related_tokens_from_text(demo):
    _, tok, _ = demo
    ids = related_tokens(tok, "Madrid and the oboe")
    words = {tok.decode([i]).strip() for i in ids}
    assert {"Madrid", "oboe"} <= words
    assert "the" not in words and "and" not in words


# ---- the whole circuit ------------------------------------------------------------------

def test_locate_demo_fact(demo64):
    model, tok, world = demo64
    template, name, attr, ent = demo_fact(world)
    cfg = LocateConfig(knockout_window=3, attribute_top_k=10)
    c = locate(template, name, model=model, tokenizer=tok, config=cfg)
    assert c.prediction.strip() == attr
    assert RecallCircuit.from_json(c.to_json()) == c
    d = json.loads(c.to_json())
    for key in ("prompt", "subject", "subject_span", "prediction", "knockout", "attribute_rate",
                "enrichment_mlps", "extraction_heads"):
        assert key in d
    assert set(d["knockout"]) == {"window", "subject", "non_subject", "last"}
    L = model.config.n_layer
    assert all(len(d["knockout"][s]) == L for s in ("subject", "non_subject", "last"))
    assert len(c.attribute_rate) == L + 1
    # the knockout curves are the knockout's, and the attribute rate is the naive one
    tp = tokenize_with_subject(tok, template, name)
    ko = attention_knockout(ModelLayout(model), tp, 3)
    assert c.knockout == ko.curves
    rec: dict = {}
    with torch.no_grad():
        naive_gpt2.forward(model, tp.input_ids, record=rec)
    stream = [rec["embed"]] + rec["resid"]
    related = {tok.encode(" " + a)[0] for a in ent.facts.values()}
    for la in range(L + 1):
        top = naive_top(model, stream[la][tp.last_subject], 10, tok)
        assert c.attribute_rate[la] == sum(t in related for t in top) / 10
    # enrichment MLPs: the layers whose removal lowers the attribute rate most, best first
    sub = c.sublayer_knockout
    drops = [sub.base_attribute_rate - r for r in sub.attribute_rate["mlp"]]
    assert [m.layer for m in c.enrichment_mlps] == sorted(
        [la for la in range(L) if drops[la] > 0], key=lambda la: -drops[la])[:3]
    assert c.enrichment_mlps and c.enrichment_mlps[0].layer <= 1  # this model enriches early
    for h in c.extraction_heads:
        assert c.head_rank[h.layer][h.head] == h.rank == 1
        assert h.score == c.head_prob[h.layer][h.head]


def test_locate_with_target_follows_it(demo):
    model, tok, world = demo
    template, name, attr, _ = demo_fact(world)
    other = next(a for a in world.relations["birthplace"].attributes if a != attr)
    c = locate(template, name, other, model=model, tokenizer=tok)
    assert c.target.strip() == other and c.prediction.strip() == attr
    assert c.knockout_target is not None and c.target_prob < c.prediction_prob
    assert c.projection["resid_rank"][-1] > 1  # the target is not the model's prediction


def word_tokenizer(bos: bool = False):
    """Whole words of a small vocabulary; with ``bos``, a [BOS] token put first, as Gemma's
    tokenizer does."""
    words = "the capital of france is paris beats music owned by apple who plays".split()
    vocab = {w: i for i, w in enumerate(["[UNK]", *words, "[BOS]"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", bos_token="[BOS]")


def test_bos_is_not_a_non_subject_source_by_default():
    """A tokenizer that puts a BOS token first (Gemma's): the prompt keeps it, the target's
    tokens do not start with it, and the non-subject knockout set leaves it out unless
    `knockout_bos` (the last position's edge to the attention sink is not relation
    information)."""
    tok = word_tokenizer(bos=True)
    bos = tok.bos_token_id
    tp = tokenize_with_subject(tok, "the capital of {} is", "beats music")
    assert tp.input_ids[0] == bos and tp.bos and tp.subject_span == (4, 6)
    assert not tokenize_with_subject(word_tokenizer(), "the capital of {} is", "beats music").bos
    assert target_token_ids(tok, tp.prompt, "paris") == [tok.convert_tokens_to_ids("paris")]
    assert source_positions(tp)["non_subject"] == [1, 2, 3]
    assert source_positions(tp, block_bos=True)["non_subject"] == [0, 1, 2, 3]
    prefixes = context_prefixes(tok, ["the capital of france is paris"] * 3, EditConfig(n_prefixes=3))
    assert len(prefixes) == 4 and not any("[BOS]" in p for p in prefixes)

    model = tiny_model("gemma3_text", dtype=torch.float32)
    cfgs = [LocateConfig(knockout_window=2), LocateConfig(knockout_window=2, knockout_bos=True)]
    off, on = (locate("the capital of {} is", "beats music", model=model, tokenizer=tok, config=c) for c in cfgs)
    assert off.config["knockout_bos"] is False and on.config["knockout_bos"] is True
    assert off.knockout.subject == on.knockout.subject
    assert off.knockout.non_subject != on.knockout.non_subject


@pytest.mark.parametrize("family", FAMILIES)
def test_locate_runs_on_every_family(family):
    model = tiny_model(family)
    c = locate("the capital of {} is", "beats music", "paris", model=model, tokenizer=word_tokenizer(),
               related="apple paris france", config=LocateConfig(knockout_window=2))
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    assert c.subject_span == [3, 5] and c.n_layers == L
    assert len(c.head_prob) == L and len(c.head_prob[0]) == H
    assert all(len(c.sublayer_knockout.prob_change[k]) == L for k in SUBLAYERS)
    vals = [v for s in ("subject", "non_subject", "last") for v in c.knockout.curve(s)]
    assert all(v == v for v in vals)  # no NaN
    assert RecallCircuit.from_json(c.to_json()) == c


# ---- errors and artefacts from elsewhere -------------------------------------------------

def test_target_tokens(demo):
    _, tok, _ = demo
    assert target_token_ids(tok, "X was born in", "Madrid") == tok.encode(" Madrid")
    assert len(target_token_ids(tok, "X was born in", "Madrid Madrid")) == 2
    with pytest.raises(PromptError, match="target is empty"):
        target_token_ids(tok, "X was born in", "  ")


def test_window_larger_than_model(demo):
    model, tok, world = demo
    template, name, _, _ = demo_fact(world)
    with pytest.raises(FactEditError, match="larger than the model's 8 layers"):
        locate(template, name, model=model, tokenizer=tok, config=LocateConfig(knockout_window=9))


def test_prompt_longer_than_context(demo):
    model, tok, world = demo
    _, name, _, _ = demo_fact(world)
    with pytest.raises(PromptError, match="context of 128"):
        locate("and " * 200 + "{} was born in", name, model=model, tokenizer=tok)


def test_circuit_from_another_model_is_refused(demo):
    model, tok, world = demo
    template, name, _, _ = demo_fact(world)
    c = locate(template, name, model=model, tokenizer=tok)
    c.check_model(model_fingerprint(model))
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.transformer.h[2].mlp.c_proj.weight.add_(1e-3)
    with pytest.raises(CircuitError, match="located on another model"):
        c.check_model(model_fingerprint(edited))
    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == model_fingerprint(
        copy.deepcopy(model).to(torch.bfloat16).float())
    with pytest.raises(CircuitError, match="not a factedit recall circuit"):
        RecallCircuit.from_json('{"prompt": "x"}')


def test_circuit_json_keeps_its_format():
    """A circuit.json written before the knockouts and the trace were typed (the demo model's,
    with a target and a causal trace) loads into the typed records and writes back byte for
    byte; a malformed record is refused with the file's name."""
    path = Path(__file__).parent / "data" / "circuit_demo_v1.json"
    text = path.read_text().strip()
    c = RecallCircuit.from_json(text)
    assert isinstance(c.knockout, KnockoutCurves) and isinstance(c.knockout_target, KnockoutCurves)
    assert isinstance(c.sublayer_knockout, SublayerKnockoutResult) and c.sublayer_knockout.token == c.target_id
    assert isinstance(c.trace, TraceResult) and c.trace.positions == [c.subject_span[1] - 1]
    assert dumps_json(c.to_dict(), indent=1) == text  # the content writes back byte for byte,
    assert json.loads(c.to_json()) == {**json.loads(text), "sha256": sha256_json(json.loads(text))}  # and its hash
    assert RecallCircuit.from_json(c.to_json()) == c
    raw = json.loads(text)
    assert c.knockout.window == raw["knockout"]["window"] and c.knockout.last == raw["knockout"]["last"]
    assert c.sublayer_knockout.attribute_rate["attn"] == raw["sublayer_knockout"]["attn"]["attribute_rate"]
    for src in ("subject", "non_subject", "last"):
        curve = raw["knockout"][src]
        assert c.knockout.strongest(src) == strongest_layer(curve) == min(range(len(curve)), key=curve.__getitem__)
    for key, bad in (("knockout", "x"), ("knockout_target", {"window": 3}), ("sublayer_knockout", {"window": 1}),
                     ("trace", {"kind": "mlp"})):
        with pytest.raises(CircuitError, match=f"{path.name}: malformed .*{key}"):
            RecallCircuit.from_json(json.dumps({**raw, key: bad}), where=str(path))


def test_sublayer_record_without_extraction_round_trips():
    """The audit's lean sublayer knockout (no extraction curves) keeps None through circuit.json."""
    sk = SublayerKnockoutResult(window=1, read_layer=2, token=5, base_prob=0.5, base_attribute_rate=None,
                                base_extraction=None, prob_change={"mlp": [-1.0, 2.0], "attn": [0.5, 0.0]},
                                attribute_rate=None, extraction=None)
    d = sk.to_dict()
    assert list(d) == ["window", "read_layer", "base_prob", "base_attribute_rate", "base_extraction", "mlp", "attn"]
    assert d["mlp"] == {"prob_change": [-1.0, 2.0], "extraction": None, "attribute_rate": None}
    assert SublayerKnockoutResult.from_dict(json.loads(json.dumps(d)), token=5) == sk


@pytest.mark.parametrize("recipe", sorted(p.name for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml")))
def test_shipped_recipes_have_valid_analysis_sections(recipe):
    from factedit.analysis.circuit import load_locate_config

    cfg = load_locate_config(Path(__file__).parents[1] / "recipes" / recipe)
    assert cfg.knockout_window >= 1
