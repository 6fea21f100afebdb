"""Editing: requests, statistics, insertion maths, the edit on the demo model, the PEFT
adapter and the merged checkpoint."""

import dataclasses
import json

import pytest
import torch

from factedit.editing.config import EditConfig
from factedit.editing.edit import compute_edit
from factedit.editing.export import save_edit
from factedit.editing.insert import least_squares, rank_one, regularised
from factedit.editing.requests import EditRequest, RequestError, held_requests, load_requests
from factedit.editing.stats import Corpus, second_moments, world_corpus
from factedit.editing.weights import NonFiniteEditError, WeightDelta, applied, apply, restore
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint
from factedit.world.evaluate import top1_tokens

from .families import FAMILIES, tiny_model

FAST = dict(stats_samples=4000, n_prefixes=4, lookup_position="last")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(demo):
    return world_corpus(demo[2], n=600)


def test_choice_fields_are_str_enums_read_and_written_as_plain_strings():
    """The recipe's fixed-choice fields are enums that read (YAML), write (JSON) and compare as
    their plain strings; an unknown value names the field and the allowed values."""
    import dataclasses

    from factedit.editing.config import BatchStrategy, Method, MlpPosition
    from factedit.editing.plan import EditPlan
    from factedit.io import dumps_json
    from factedit.recipes import RecipeError, from_dict

    cfg = from_dict(EditConfig, {"method": "mlp", "batch_strategy": "refit"}, where="r.yaml: edit")
    assert cfg.method is Method.MLP and cfg.method == "mlp" and f"{cfg.method}" == "mlp" and str(cfg.method) == "mlp"
    assert EditConfig(batch_strategy="refit").batch_strategy is BatchStrategy.REFIT  # a plain string in code
    assert json.loads(dumps_json(dataclasses.asdict(cfg)))["method"] == "mlp"
    with pytest.raises(RecipeError, match=r"r.yaml: edit.method: expected one of circuit, mlp, heads, lora, "
                                          r"ft, got 'rome'"):
        from_dict(EditConfig, {"method": "rome"}, where="r.yaml: edit")
    for name in ("mlp_site", "head_fallback", "sequential_strategy", "batch_strategy", "insert_keys",
                 "lookup_position"):
        with pytest.raises(RecipeError, match=f"edit.{name}: expected one of"):
            EditConfig(**{name: "nope"})
    cfg.sequential_strategy = "nope"  # set after construction: validate() still catches it
    with pytest.raises(RecipeError, match="edit.sequential_strategy: expected one of kept, refit, nullspace"):
        cfg.validate()
    plan = EditPlan.from_dict({"mlp_layer": 3, "heads": [[4, 1]], "mlp_position": "last"})
    assert plan.mlp_position is MlpPosition.LAST and plan.heads == [(4, 1)] and plan.why == ""
    assert json.loads(dumps_json(dataclasses.asdict(plan)))["mlp_position"] == "last"
    with pytest.raises(RecipeError, match="plan.mlp_position: expected one of subject, last"):
        EditPlan.from_dict({"mlp_layer": 3, "heads": [], "mlp_position": "first"})


def fact(world, i=5, rid="birthplace"):
    e = world.entities[i]
    rel = world.relations[rid]
    new = next(a for a in rel.attributes if a != e.facts[rid])
    return e, rel, EditRequest(rel.templates[0], e.name, new, e.facts[rid])


def top1(model, tok, prompts):
    return [tok.decode([i]).strip() for i in top1_tokens(model, tok, prompts)]


# ---- requests ----------------------------------------------------------------------------

def test_request_files(tmp_path):
    cf = [{"case_id": 7, "requested_rewrite": {"prompt": "{} was born in", "subject": "Ada",
                                                "target_new": {"str": "Paris"}, "target_true": {"str": "Rome"}},
           "paraphrase_prompts": ["Ada's birthplace is"], "neighborhood_prompts": ["Bob was born in"]}]
    (tmp_path / "cf.json").write_text(json.dumps(cf))
    (r,) = load_requests(tmp_path / "cf.json")
    assert (r.prompt, r.subject, r.target_new, r.target_true) == ("{} was born in", "Ada", "Paris", "Rome")
    assert r.case_id == 7
    assert r.paraphrase_prompts == ["Ada's birthplace is"] and r.filled_prompt == "Ada was born in"
    (tmp_path / "flat.jsonl").write_text('{"prompt": "Ada was born in", "subject": "Ada", "target_new": "Oslo"}\n'
                                         '{"prompt": "{} plays", "subject": "Bob", "target_new": "oboe"}\n')
    assert [x.target_new for x in load_requests(tmp_path / "flat.jsonl")] == ["Oslo", "oboe"]


@pytest.mark.parametrize("text,msg", [
    ('[{"prompt": "{} was born in", "subject": "Ada"}]', "record 0: missing field 'target_new'"),
    ('[{"prompt": "x", "subject": "Ada", "target_new": "P"}]', "does not occur in the prompt"),
    ('[{"case_id": 3, "requested_rewrite": {"prompt": "{} is", "subject": "A", "target_new": {"str": 5}}}]',
     "record 0 (case_id 3), requested_rewrite: field 'target_new' must be a string"),
    ('{"prompt": "{} is", "subject": "A", "target_new": "B"}\n{oops', "line 2"),
    ("[]", "holds no requests"),
])
def test_bad_request_files_name_record_and_field(tmp_path, text, msg):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(RequestError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_requests(tmp_path / "r.json")


# ---- maths -------------------------------------------------------------------------------

def test_rank_one_hits_the_key_and_least_squares_matches_normal_equations():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 12, generator=g, dtype=torch.float64)
    C = (X.T @ X / 500).float()
    k, delta = torch.randn(12, generator=g), torch.randn(7, generator=g)
    b, a = rank_one(C, k, delta, ridge=0.0)
    torch.testing.assert_close((b @ a) @ k, delta, atol=1e-5, rtol=1e-5)
    # the update is the C-weighted least change: for keys C-orthogonal to k it is zero
    kk = torch.randn(12, generator=g, dtype=torch.float64)
    kk = kk - (kk @ torch.linalg.solve(C.double(), k.double())) / (k.double() @ torch.linalg.solve(
        C.double(), k.double())) * k.double()
    assert float(((b @ a).double() @ kk).norm()) < 1e-4
    # with a null key: fires on k, not on k0 (the subject-conditional insertion)
    k0 = torch.randn(12, generator=g)
    b, a = rank_one(C, k, delta, ridge=0.0, null_keys=k0[None])
    torch.testing.assert_close((b @ a) @ k, delta, atol=1e-4, rtol=1e-4)
    assert float(((b @ a) @ k0).norm()) < 1e-4
    # a null key close to the key would cost too much to hold (> NULL_MAX_COST times ROME's
    # update in C's norm): ROME's update is kept
    near = k + 0.01 * torch.randn(12, generator=g)
    b, a = rank_one(C, k, delta, ridge=0.0, null_keys=near[None])
    b0, a0 = rank_one(C, k, delta, ridge=0.0)
    torch.testing.assert_close(b @ a, b0 @ a0)
    # with earlier edits' keys kept (sequential): the least change under C + Kp^T Kp / lam,
    # solved naively here, and the kept keys move less than under C alone
    Kp = torch.randn(3, 12, generator=g)
    b, a = rank_one(C, k, delta, ridge=0.0, kept=(Kp.T @ Kp, 0.5))  # their Gram matrix
    Cp = C.double() + Kp.double().T @ Kp.double() / 0.5
    u = torch.linalg.solve(Cp, k.double())
    torch.testing.assert_close((b @ a).double(), delta.double()[:, None] * (u / (k.double() @ u))[None],
                               atol=1e-5, rtol=1e-4)
    b0, a0 = rank_one(C, k, delta, ridge=0.0)
    assert float(((b @ a) @ Kp.T).norm()) < 0.5 * float(((b0 @ a0) @ Kp.T).norm())
    K, R = torch.randn(5, 12, generator=g), torch.randn(5, 7, generator=g)
    b, a = least_squares(C, K, R, lam=2.0, ridge=0.0)
    # naive: minimise ||dW K^T - R^T||^2 + lam * tr(dW C dW^T)  ->  dW (lam C + K^T K) = R^T K
    want = torch.linalg.solve((2.0 * C.double() + K.double().T @ K.double()).T, (R.double().T @ K.double()).T).T
    torch.testing.assert_close((b @ a).double(), want, atol=1e-5, rtol=1e-4)
    assert regularised(C, 0.1).diagonal().min() > C.diagonal().min()


def test_rank_one_for_every_context_key_matches_the_naive_closed_form():
    """edit.insert_keys "contexts": the C-smallest rank-one update mapping each context's own key
    to delta, against the naive closed form u = C^-1 K^T (K C^-1 K^T)^-1 1 (K: keys as rows),
    and ROME's update (the mean key) shown to give the keys only shares r_i of delta."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(400, 10, generator=g, dtype=torch.float64)
    C = (X.T @ X / 400).float()
    # a fact's key in 4 contexts: one direction plus context noise
    K = torch.randn(10, generator=g)[None] + 0.3 * torch.randn(4, 10, generator=g)
    delta = torch.randn(6, generator=g)
    k = K.mean(0)
    b, a = rank_one(C, k, delta, ridge=0.0, context_keys=K)
    Cd, Kd = C.double(), K.double()
    CiKt = torch.linalg.solve(Cd, Kd.T)
    u = CiKt @ torch.linalg.solve(Kd @ CiKt, torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close((b @ a).double(), delta.double()[:, None] * u[None], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close((b @ a) @ K.T, delta[:, None].expand(6, 4), atol=1e-4, rtol=1e-4)
    # it is the least change in C's norm among updates that hit every key: any other (here one
    # that also fixes a random direction's output) costs more
    x = torch.randn(10, generator=g, dtype=torch.float64)
    K2 = torch.cat([Kd, x[None]])
    CiK2 = torch.linalg.solve(Cd, K2.T)
    u2 = CiK2 @ torch.linalg.solve(K2 @ CiK2, torch.tensor([1.0] * 4 + [0.3], dtype=torch.float64))
    assert float(u @ Cd @ u) < float(u2 @ Cd @ u2)
    # ROME's update for the mean key hits the mean, and context i only by r_i (mean 1, not all 1)
    b0, a0 = rank_one(C, k, delta, ridge=0.0)
    r = (a0.double() @ Kd.T)[0]
    torch.testing.assert_close(r, (k.double() @ CiKt) / (k.double() @ torch.linalg.solve(Cd, k.double())))
    assert abs(float(r.mean()) - 1) < 1e-5 and float((r - 1).abs().max()) > 1e-2
    # one context key is ROME's update; keys spanning a repeated one are solved (pseudo-inverse)
    b1, a1 = rank_one(C, k, delta, ridge=0.0, context_keys=k[None])
    torch.testing.assert_close(b1 @ a1, b0 @ a0)
    b2, a2 = rank_one(C, k, delta, ridge=0.0, context_keys=torch.cat([K, K[:1]]))
    torch.testing.assert_close(b2 @ a2, b @ a, atol=1e-4, rtol=1e-4)
    # with a null key too: all context keys hit, the null key not
    k0 = torch.randn(10, generator=g)
    b3, a3 = rank_one(C, k, delta, ridge=0.0, null_keys=k0[None], context_keys=K)
    torch.testing.assert_close((b3 @ a3) @ K.T, delta[:, None].expand(6, 4), atol=1e-4, rtol=1e-4)
    assert float(((b3 @ a3) @ k0).norm()) < 1e-4
    with pytest.raises(Exception, match="insert_keys"):
        EditConfig(insert_keys="all").validate()


def test_lookup_edit_needs_a_candidate_mlp_at_or_above_the_read(demo):
    """A lookup circuit is edited at the last position only where a candidate MLP sits at or
    above the layer that reads the subject; below it the update would key on the template, so
    the subject's MLP is edited instead."""
    import copy

    from factedit.analysis.circuit import LocateConfig
    from factedit.analysis.locate import locate
    from factedit.editing.plan import plan_for

    model, tok, _ = demo
    c = copy.deepcopy(locate("{} was born in", "Roric Dunnford", model=model, tokenizer=tok,
                             config=LocateConfig(knockout_window=3)))
    c.knockout.subject = [0.0] * 8
    c.knockout.subject[6] = -5.0  # read at L6 (window 5-7), too weak a drop for "extraction": lookup
    plan = plan_for(c, EditConfig(method="circuit", lookup_position="last"), 8)
    assert (plan.mechanism, plan.mlp_position, plan.mlp_layer, plan.read_layers) == ("lookup", "last", 5, [5])
    plan = plan_for(c, EditConfig(method="circuit", lookup_position="subject"), 8)  # the real models' recipes
    assert (plan.mechanism, plan.mlp_position, plan.read_layers) == ("lookup", "subject", [])
    assert "edited at the subject (edit.site.lookup_position)" in plan.why and "read at L5" in plan.why
    plan = plan_for(c, EditConfig(method="circuit", mlp_layers=[1, 2], lookup_position="last"), 8)
    assert (plan.mlp_position, plan.heads) == ("subject", []) and plan.mlp_layer in (1, 2)
    assert "edited at the subject" in plan.why


def test_max_heads_zero_edits_no_head_and_says_none(demo):
    """With ``max_heads: 0`` (Gemma-3's recipe) a circuit's located extraction heads are not
    edited, and the plan's explanation does not claim them."""
    import copy

    from factedit.analysis.circuit import ExtractionHead, LocateConfig
    from factedit.analysis.locate import locate
    from factedit.editing.plan import plan_for

    model, tok, _ = demo
    c = copy.deepcopy(locate("{} was born in", "Roric Dunnford", model=model, tokenizer=tok,
                             config=LocateConfig(knockout_window=3)))
    c.knockout.subject = [0.0] * 8
    c.knockout.subject[6] = -50.0  # read high up: the extraction mechanism
    c.extraction_heads = [ExtractionHead(6, 1, 0.4, 1)]
    plan = plan_for(c, EditConfig(method="circuit"), 8)
    assert plan.mechanism == "extraction" and plan.heads == [(6, 1)] and "heads: located" in plan.why
    plan = plan_for(c, EditConfig(method="circuit", max_heads=0), 8)
    assert plan.heads == [] and "heads:" not in plan.why


def test_scope_chooses_the_components(demo):
    """``site.scope``: subject edits the subject's MLP and no head, whatever the mechanism;
    relation the last position's MLP at the first layer of the subject-knockout window (found
    here by hand from the curve), with no head; both is the circuit's plan as before."""
    import copy

    from factedit.analysis.circuit import ExtractionHead, LocateConfig
    from factedit.analysis.locate import locate
    from factedit.editing.plan import plan_for

    model, tok, _ = demo
    c = copy.deepcopy(locate("{} was born in", "Roric Dunnford", model=model, tokenizer=tok,
                             config=LocateConfig(knockout_window=3)))
    c.knockout.subject = [0.0, -1.0, 0.0, 0.0, -10.0, -50.0, -20.0, 0.0]  # read at L5, window L4-L6
    c.extraction_heads = [ExtractionHead(6, 1, 0.4, 1)]
    both = plan_for(c, EditConfig(method="circuit"), 8)
    assert both.mechanism == "extraction" and both.heads == [(6, 1)] and both.mlp_position == "subject"
    subj = plan_for(c, EditConfig(method="circuit", scope="subject"), 8)
    assert (subj.mlp_layer, subj.mlp_position, subj.heads) == (both.mlp_layer, "subject", [])
    rel = plan_for(c, EditConfig(method="circuit", scope="relation", mlp_layers=[1]), 8)
    worst = min(range(8), key=lambda la: c.knockout.subject[la])
    assert (rel.mlp_layer, rel.mlp_position, rel.heads) == (worst - 1, "last", [])  # window 3: worst-1..worst+1
    assert rel.read_layers == [worst - 1] and "scope relation" in rel.why
    c.knockout.subject = [0.0] * 8
    c.knockout.subject[6] = -5.0  # a lookup fact: subject scope keeps it at the subject
    assert plan_for(c, EditConfig(method="circuit", scope="subject"), 8).mlp_position == "subject"
    with pytest.raises(FactEditError, match="scope"):
        EditConfig(method="circuit", scope="everything").validate()


def test_scope_relation_edit_lands_and_keeps_the_subjects_other_facts(demo, corpus):
    model, tok, world = demo
    e, rel, req = fact(world)
    res = compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST, scope="relation"), progress=False)
    assert res.plans[0].mlp_position == "last" and res.plans[0].heads == []
    other_rids = [r for r in world.relations if r != "birthplace"]
    with applied(model, res.delta):
        assert top1(model, tok, [rel.templates[0].format(e.name)]) == [req.target_new]
        same = top1(model, tok, [world.relations[r].templates[0].format(e.name) for r in other_rids])
    assert sum(s == e.facts[r] for s, r in zip(same, other_rids)) >= len(other_rids) - 1


def test_second_moments_match_naive_and_are_cached(demo, tmp_path):
    model, tok, _ = demo
    adapter = ModelLayout(model)
    texts = ["Ada was born in Paris.", "Bob plays the oboe. He keeps a pony."] * 5
    corpus = Corpus("t", texts)
    fp = model_fingerprint(model)
    got, rep = second_moments(adapter, tok, corpus, [("mlp", 1), ("attn", 2)], fp, samples=10_000,
                              max_length=16, progress=False)
    ids = sum((tok.encode(t) + [tok.eos_token_id] for t in texts), [])
    keys = {"mlp": [], "attn": []}
    h1 = adapter.mlp_out(1).register_forward_pre_hook(lambda m, a: keys["mlp"].append(a[0][0]))
    h2 = adapter.attn(2).register_forward_pre_hook(lambda m, a, kw: keys["attn"].append(
        (a[0] if a else kw["hidden_states"])[0]), with_kwargs=True)
    with torch.no_grad():
        for s in range(0, len(ids), 16):
            model(input_ids=torch.tensor([ids[s : s + 16]]))
    h1.remove()
    h2.remove()
    for kind, layer in (("mlp", 1), ("attn", 2)):
        x = torch.cat(keys[kind]).double()
        torch.testing.assert_close(got[(kind, layer)].double(), x.T @ x / len(ids), atol=1e-5, rtol=1e-4)
    assert rep.tokens == len(ids) and rep.computed
    again, rep2 = second_moments(adapter, tok, corpus, [("mlp", 1)], fp, samples=10_000, max_length=16,
                                 progress=False)
    assert not rep2.computed and torch.equal(again[("mlp", 1)], got[("mlp", 1)])


class _BosTokenizer:
    """The demo tokenizer made to start every input with BOS, as Llama's and Gemma's do."""

    def __init__(self, tok, bos: int):
        self.tok, self.bos_token_id, self.eos_token_id = tok, bos, tok.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_statistics_windows_start_with_bos_once_and_skip_it(demo):
    from factedit.editing.stats import _chunks, bos_prefix

    model, tok, _ = demo
    texts = ["Ada was born in Paris.", "Bob plays the oboe. He keeps a pony."] * 5
    stream = sum((tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts), [])
    bos = next(i for i in range(len(tok)) if i not in stream)  # a token the texts never use
    btok = _BosTokenizer(tok, bos=bos)
    assert bos_prefix(btok) == [bos] and bos_prefix(tok) == []
    windows = list(_chunks(btok, texts, 16))
    assert all(w[0] == bos and bos not in w[1:] and len(w) <= 16 for w in windows)
    assert sum((w[1:] for w in windows), []) == stream  # every corpus token once, in order
    assert list(_chunks(tok, texts, 16)) == [stream[s: s + 16] for s in range(0, len(stream), 16)]
    adapter = ModelLayout(model)
    got, rep = second_moments(adapter, btok, Corpus("t", texts), [("mlp", 1)], model_fingerprint(model),
                              samples=10_000, max_length=16, use_cache=False, progress=False)
    assert rep.tokens == len(stream)  # the BOS positions are not counted
    keys = []
    h = adapter.mlp_out(1).register_forward_pre_hook(lambda m, a: keys.append(a[0][0, 1:]))
    with torch.no_grad():
        for w in windows:
            model(input_ids=torch.tensor([w]))
    h.remove()
    x = torch.cat(keys).double()
    torch.testing.assert_close(got[("mlp", 1)].double(), x.T @ x / len(stream), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_value_rows_are_the_heads_value_vectors(family):
    """A rank-one update through ``value_rows`` changes exactly that KV head's value at the key
    by delta (fused GPT-2 and GPT-NeoX layouts, grouped KV heads)."""
    model = tiny_model(family)
    adapter = ModelLayout(model)
    layer, head = 1, 3
    kv = adapter.kv_head(head)
    got = {}
    h = adapter.v_proj(layer).register_forward_hook(lambda m, a, o: got.update(v=o[0].clone()))
    hin = adapter.attn(layer).register_forward_pre_hook(
        lambda m, a, kw: got.update(x=(a[0] if a else kw["hidden_states"])[0].clone()), with_kwargs=True)
    ids = torch.tensor([[5, 17, 23, 42, 8]])
    with torch.no_grad():
        model(input_ids=ids)
    hin.remove()
    before, key = got["v"], got["x"][2]
    rows = adapter.value_rows(layer, kv)
    delta = torch.randn(len(rows), dtype=torch.float64)
    C = torch.eye(adapter.d_model)
    b_h, a = rank_one(C, key.float(), delta.float(), ridge=0.0)
    b = torch.zeros(adapter.out_weight(adapter.v_proj(layer)).shape[0], 1)
    b[rows] = b_h
    d = WeightDelta(conv1d=adapter.spec.conv1d)
    d.add(adapter.module_name(layer, adapter.spec.v_proj), b, a)
    with torch.no_grad(), applied(model, d):
        model(input_ids=ids)
    h.remove()
    change = got["v"][2] - before[2]
    torch.testing.assert_close(change[rows], delta, atol=1e-5, rtol=1e-4)
    others = [i for i in range(change.shape[-1]) if i not in rows]
    assert not others or float(change[others].abs().max()) == 0.0


def test_apply_then_restore_is_bit_exact(demo):
    model, _, _ = demo
    name = "transformer.h.3.mlp.c_proj"
    before = model.get_submodule(name).weight.detach().clone()
    d = WeightDelta(conv1d=True)
    d.add(name, torch.randn(128, 2) * 0.37, torch.randn(2, 512) * 0.11)
    saved = apply(model, d)
    assert not torch.equal(model.get_submodule(name).weight, before)
    restore(model, saved)
    assert torch.equal(model.get_submodule(name).weight, before)


# ---- edits on the demo model -------------------------------------------------------------

def test_single_edit_changes_the_fact_and_nothing_else(demo, corpus):
    model, tok, world = demo
    e, rel, req = fact(world)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST), progress=False)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # base untouched
    plan = res.plans[0]
    assert plan.mechanism == "lookup" and plan.mlp_position == "last"  # what the demo model does
    others = [x for x in world.entities[20:30]]
    other_rids = [r for r in world.relations if r != "birthplace"]
    with applied(model, res.delta):
        assert set(top1(model, tok, [t.format(e.name) for t in rel.templates])) == {req.target_new}
        assert top1(model, tok, [rel.heldout_templates[0].format(e.name)]) == [req.target_new]
        assert top1(model, tok, [rel.templates[1].format(o.name) for o in others]) == [
            o.facts["birthplace"] for o in others]
        same = top1(model, tok, [world.relations[r].templates[0].format(e.name) for r in other_rids])
    assert sum(s == e.facts[r] for s, r in zip(same, other_rids)) >= len(other_rids) - 1


def test_adapter_loads_with_plain_peft_and_merged_with_plain_transformers(demo, corpus, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok, world = demo
    e, rel, req = fact(world, 9, "instrument")
    res = compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST), progress=False)
    save_edit(res, tmp_path / "a", model, tok, merge=True)
    ids = torch.tensor([tok.encode(rel.templates[2].format(e.name))])
    with torch.no_grad():
        with applied(model, res.delta):
            want = model(ids).logits
        base = AutoModelForCausalLM.from_pretrained(model.name_or_path)
        got = PeftModel.from_pretrained(base, tmp_path / "a")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "merged")(ids).logits
    # float32: the adapter computes B(A x) where the direct edit adds (BA) to W
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=0)
    assert tok.decode([int(got[0, -1].argmax())]).strip() == req.target_new
    man = json.loads((tmp_path / "a" / "edits.json").read_text())
    assert man["base_fingerprint"] == model_fingerprint(model) and man["requests"][0]["subject"] == e.name
    assert man["circuits"][0]["format"].startswith("factedit.recall_circuit")


def test_same_edit_same_seed_gives_identical_adapter_bytes(demo, corpus, tmp_path):
    model, tok, world = demo
    _, _, req = fact(world, 11, "sport")
    for d in ("x", "y"):
        res = compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST), progress=False)
        save_edit(res, tmp_path / d, model, tok)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "x" / f).read_bytes() == (tmp_path / "y" / f).read_bytes()


def test_non_finite_update_is_refused_and_nothing_written(demo, corpus, tmp_path):
    model, tok, world = demo
    _, _, req = fact(world)
    res = compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST), progress=False)
    name = res.delta.modules()[0]
    b, a = res.delta.factors[name][0]
    res.delta.factors[name][0] = (b * float("nan"), a)
    with pytest.raises(NonFiniteEditError, match="NaN or inf"):
        save_edit(res, tmp_path / "out", model, tok)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode,strategy", [("sequential", "spread"), ("batch", "spread"),
                                           pytest.param("batch", "refit", marks=pytest.mark.slow)])
def test_many_edits(demo, corpus, mode, strategy):
    model, tok, world = demo
    reqs, ents = [], []
    for i in range(6):
        e, rel, req = fact(world, 40 + i, list(world.relations)[i % 8])
        reqs.append(req)
        ents.append((e, rel))
    cfg = EditConfig(**FAST, batch_lambda=300.0)
    if strategy == "refit":  # every layer adds a little: a large λ
        cfg = EditConfig(**FAST, batch_lambda=3000.0, batch_strategy="refit", batch_layers=list(range(8)),
                         held_prompts=2)
    held = [h.filled_prompt for h in held_requests(reqs, 2)]
    before = top1(model, tok, held)
    res = compute_edit(reqs, model, tok, corpus, cfg=cfg, mode=mode, progress=False)
    if mode == "batch":
        assert len(res.delta.modules()) == len(cfg.batch_layers or [0])
    with applied(model, res.delta):
        got = top1(model, tok, [rel.templates[1].format(e.name) for e, rel in ents])
        after = top1(model, tok, held)
    assert sum(g == r.target_new for g, r in zip(got, reqs)) >= 5
    if strategy == "refit":  # the held prompts (other subjects, other relations) keep their answers
        assert sum(a == b for a, b in zip(after, before)) >= len(held) - 1


def test_held_requests_ask_other_subjects_never_an_edited_pair():
    reqs = [EditRequest("{} was born in", s, "Paris") for s in ("A", "B", "C")]
    reqs += [EditRequest("A lives in", "A", "Rome"), EditRequest("{} plays", "B", "chess")]
    held = held_requests(reqs, 2, seed=3)
    edited = {(r.template, r.subject) for r in reqs}
    pairs = [(h.template, h.subject) for h in held]
    assert not edited & set(pairs) and len(set(pairs)) == len(pairs)
    # "{} was born in" has no free subject; "{} lives in" has B and C; "{} plays" has A and C
    assert sorted(pairs) == [("{} lives in", "B"), ("{} lives in", "C"), ("{} plays", "A"), ("{} plays", "C")]
    assert held_requests(reqs, 2, seed=3) == held and held_requests(reqs, 0) == []


def test_lora_baseline_and_heads_only(demo, corpus):
    model, tok, world = demo
    e, rel, req = fact(world, 13, "pet")
    res = compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST, method="lora"), progress=False)
    assert len(res.delta.modules()) == model.config.n_layer and res.nll[0]["after_fit"] < res.nll[0]["before"]
    with applied(model, res.delta):
        assert top1(model, tok, [rel.templates[0].format(e.name)]) == [req.target_new]
    res = compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST, method="heads"), progress=False)
    assert res.plans[0].heads and all(".attn.c_attn" in n for n in res.delta.modules())


def test_lora_batch_in_chunks_equals_one_batch(demo, corpus):
    """A LoRA batch too large for ``edit.fit_memory_gib`` is trained in chunks whose gradients
    accumulate into each Adam step: the same loss as one batch, so the same factors up to
    float32 rounding of other batch shapes (tolerance 1e-4 relative)."""
    from factedit.editing.lora_ft import lora_finetune
    from factedit.editing.values import fit_chunk_size

    model, tok, world = demo
    reqs = [fact(world, i, "pet")[2] for i in (13, 14, 15)]
    adapter = ModelLayout(model)
    whole = EditConfig(**FAST, method="lora", lora_steps=5)
    tiny = EditConfig(**FAST, method="lora", lora_steps=5, fit_memory_gib=1e-4)
    assert fit_chunk_size(adapter, 4, tiny) == 1 and fit_chunk_size(adapter, 4, whole) >= 3
    d1, nll1 = lora_finetune(adapter, tok, reqs, corpus, whole)
    d2, nll2 = lora_finetune(adapter, tok, reqs, corpus, tiny)
    assert d1.modules() == d2.modules()
    for name in d1.modules():
        torch.testing.assert_close(d2.dense(name), d1.dense(name), rtol=1e-4, atol=1e-6)
    for a, b in zip(nll1, nll2, strict=True):
        assert a["before"] == pytest.approx(b["before"], rel=1e-5)
        assert a["after_fit"] == pytest.approx(b["after_fit"], rel=1e-4)


def test_an_edit_with_no_site_is_refused_by_name(demo, corpus):
    """Method heads with max_heads 0 (how a recipe turns head updates off) is a recipe error,
    and a fact whose plan has no site (no head located, no fallback) a RequestError naming
    the request, raised before any fit (not the optimiser's "empty parameter list")."""
    from factedit.recipes import RecipeError

    model, tok, world = demo
    _e, _rel, req = fact(world, 13, "pet")
    with pytest.raises(RecipeError, match="max_heads is 0.*--set max_heads=2"):
        compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST, method="heads", max_heads=0), progress=False)
    c = compute_edit([req], model, tok, corpus, cfg=EditConfig(**FAST, method="heads"), progress=False).circuits[0]
    c.extraction_heads = []
    cfg = EditConfig(**FAST, method="heads", head_fallback="none")
    with pytest.raises(RequestError, match="request 0: method heads found no site to edit.*method circuit or mlp"):
        compute_edit([req], model, tok, corpus, cfg=cfg, circuits=[c], progress=False)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ft_l_matches_a_naive_constrained_fine_tune(family):
    """FT-L: Adam on one MLP output weight, the change clipped to ±ε after each step, on the
    bare prompt's target NLL. Against a hand-written loop on a copy of the weight (one prompt:
    no padding), the deltas agree to float32 rounding (1e-6); nothing else moves; the base
    weights come back unchanged (GPT-2's Conv1D stores the weight transposed)."""
    from .test_locate import word_tokenizer

    torch.manual_seed(0)
    model = tiny_model(family).float()
    tok = word_tokenizer()
    tok.pad_token = "[UNK]"
    req = EditRequest("the capital of {} is", "beats music", "apple")
    cfg = EditConfig(method="ft", mlp_layers=[1], ft_steps=5, ft_lr=1e-2, ft_norm_constraint=2e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = compute_edit([req], model, tok, Corpus("w", ["the capital of france is paris"] * 4), cfg=cfg,
                       progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    adapter = ModelLayout(model)
    name = adapter.module_name(1, adapter.spec.mlp_out)
    assert res.delta.modules() == [name]
    got = res.delta.dense(name)
    assert got.abs().max() <= 2e-3 + 1e-6 and got.abs().max() > 1e-3  # float32: w0 + d - w0 rounds d
    # the naive loop
    w = model.get_submodule(name).weight
    w0 = w.detach().clone()
    ids = tok(req.filled_prompt + " apple", return_tensors="pt")["input_ids"]
    param = torch.nn.Parameter(w0.clone())
    opt = torch.optim.Adam([param], lr=1e-2)
    for _ in range(5):
        with torch.no_grad():
            w.copy_(param)
        w.requires_grad_(True)
        loss = -model(input_ids=ids[:, :-1]).logits[0, -1].log_softmax(-1)[ids[0, -1]]
        (g,) = torch.autograd.grad(loss, [w])
        w.requires_grad_(False)
        param.grad = g
        opt.step()
        with torch.no_grad():
            param.copy_(w0 + (param - w0).clamp(-2e-3, 2e-3))
    with torch.no_grad():
        w.copy_(w0)
    want = (param.detach() - w0).T if adapter.spec.conv1d else param.detach() - w0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert res.nll[0]["after_fit"] < res.nll[0]["before"]


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_runs_on_every_family(family):
    from .test_locate import word_tokenizer

    model = tiny_model(family).float()
    tok = word_tokenizer()
    tok.pad_token = "[UNK]"
    tok.eos_token = "[UNK]"
    corpus = Corpus("w", ["the capital of france is paris", "beats music is owned by apple"] * 20)
    req = EditRequest("the capital of {} is", "beats music", "apple")
    for method in ("circuit", "heads"):
        res = compute_edit([req], model, tok, corpus, progress=False,
                           cfg=EditConfig(method=method, stats_samples=200, n_prefixes=2, steps=5))
        assert res.delta.modules()
        res.delta.check_finite()


def _fit_two_ways(family: str, reqs: list[EditRequest], prefixes: list[str], sites_of, fast_path: str,
                  monkeypatch):
    """The value fit of ``reqs`` on a float64 tiny model of ``family``, with the fast path
    ``fast_path`` ("last_token_only" or "_SuffixRun") and with it turned off (the full prompt).
    Returns (rows, used: whether the fast path applies to them, fast, full)."""
    import factedit.editing.values as values

    from .test_locate import word_tokenizer

    tok = word_tokenizer()
    tok.pad_token = "[UNK]"
    adapter = ModelLayout(tiny_model(family).double())
    cfg = EditConfig(steps=4, n_prefixes=0, kl_prompt="{} is")
    sites = sites_of(adapter)
    rows = values.build_rows(tok, reqs, prefixes, cfg.kl_prompt)
    last = fast_path == "last_token_only"
    used = values.last_token_only(rows, sites) if last else values._SuffixRun.usable(adapter, rows)
    fast = values.fit_values(adapter, tok, reqs, prefixes, sites, cfg)
    if last:
        monkeypatch.setattr(values, "last_token_only", lambda rows, sites: False)
    else:
        monkeypatch.setattr(values._SuffixRun, "usable", staticmethod(lambda adapter, rows: False))
    full = values.fit_values(adapter, tok, reqs, prefixes, sites, cfg)
    return rows, used, fast, full


@pytest.mark.usefixtures("fp64_norms")
@pytest.mark.parametrize("family", FAMILIES)
def test_last_token_fit_matches_the_full_prompt_fit(family, monkeypatch):
    """Fitting a last-position MLP value on the last tokens alone (cached keys and values of the
    earlier tokens, right-padded) gives the full-prompt fit: same starting NLL, same deltas.
    Prompts of different lengths exercise the padding and the position ids. float64, so the
    two orders of summation agree to ~1e-10; Adam's steps then keep the deltas within 1e-6."""
    import factedit.editing.values as values

    reqs = [EditRequest("the capital of {} is", "beats music", "apple"),
            EditRequest("{} is owned by", "france", "paris"),
            EditRequest("beats music is owned by the capital of {} is", "apple", "music")]
    rows, used, fast, full = _fit_two_ways(family, reqs, [""], lambda a: values.ValueSites(1, [], "last"),
                                           "last_token_only", monkeypatch)
    assert used and len({len(r.ids) for r in rows}) > 1
    torch.testing.assert_close(torch.tensor(fast.base_nll), torch.tensor(full.base_nll), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(fast.mlp, full.mlp, atol=1e-6, rtol=1e-6)
    assert float(fast.mlp.norm()) > 0


@pytest.mark.usefixtures("fp64_norms")
@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_fit_matches_the_full_prompt_fit(family, monkeypatch):
    """Fitting subject-site values (an MLP and a head's value) on each row's suffix from the
    subject's last token (the earlier tokens cached, right-padded to one length) gives the
    full-prompt fit. Subjects end at different positions and rows differ in length, so the
    padding, the position ids and the shifted target positions are all exercised. float64,
    but transformers computes rotary tables in float32, and their cos/sin differ by an ulp
    (~1e-7 relative) with the length of the position tensor (vectorised paths): tolerance 1e-5.
    Families with a sliding window shorter than the rows fall back to the full prompt."""
    import factedit.editing.values as values

    reqs = [EditRequest("the capital of {} is", "beats music", "apple music"),
            EditRequest("{} is owned by", "france", "paris"),
            EditRequest("beats music is owned by the capital of {} is", "apple", "music")]
    rows, used, fast, full = _fit_two_ways(
        family, reqs, ["", "the capital is paris."],
        lambda a: values.ValueSites(1, [(2, a.kv_head(1))], "subject"), "_SuffixRun", monkeypatch)
    assert len({r.s_last for r in rows}) > 2 and len({len(r.ids) for r in rows}) > 2
    assert used == (family not in ("gemma2", "gemma3_text"))  # their sliding windows are shorter than the rows
    torch.testing.assert_close(torch.tensor(fast.base_nll), torch.tensor(full.base_nll), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.mlp, full.mlp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.heads, full.heads, atol=1e-5, rtol=1e-5)
    assert float(fast.mlp.norm()) > 0 and float(fast.heads.norm()) > 0


def _nearest_normed(norm, m: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Naive reference: the output norm(u) nearest ``target`` over all inputs u, by L-BFGS
    from u = m in float64 (no use of the ellipsoid or its Lagrange condition)."""
    u = m.detach().clone().double().requires_grad_()
    opt = torch.optim.LBFGS([u], max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-18,
                            line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        out = (norm(u) - target).pow(2).sum()
        out.backward()
        return out

    for _ in range(5):
        opt.step(loss)
    return norm(u).detach()


def _spread_setup(dead: list[int] | None = None, tiny: list[int] | None = None):
    from factedit.editing.insert import at_token

    from .test_locate import word_tokenizer

    tok = word_tokenizer()
    tok.pad_token = "[UNK]"
    req = EditRequest("the capital of {} is", "beats music", "apple")
    model = tiny_model("gemma3_text")
    adapter = ModelLayout(model)
    layer = 1
    norm = adapter.post_norm("mlp", layer)
    with torch.no_grad():
        for i in dead or []:
            norm.weight[i] = -1.0  # gain exactly 0 there
        for i in tiny or []:
            norm.weight[i] = -1.0 + 1e-4  # gain 1e-4 there
    m = at_token(adapter, tok, [req], [""], adapter.mlp(layer), "out").double()  # (1, d)
    return tok, req, model, adapter, layer, norm, m


@pytest.mark.usefixtures("fp64_norms")
def test_spread_conversions_under_a_post_mlp_norm():
    """MEMIT's spread works in residual space; under a post-MLP norm (Gemma) the residual
    receives norm(m) for the MLP output m. `mlp_to_residual` is norm(m + delta) - norm(m);
    `residual_to_mlp` gives the MLP change whose normed output is the reachable one nearest
    norm(m) + resid: exactly norm(m) + resid where that is reachable (the normed output of
    another input), else the naive L-BFGS optimum over all inputs. One prompt, so the prefix
    average is that prompt's value. Tolerance 1e-5 relative (float32 model reads, eps)."""
    from factedit.editing.insert import mlp_to_residual, residual_to_mlp

    tok, req, model, adapter, layer, norm, m = _spread_setup()
    with torch.no_grad():
        r = norm(m)
        torch.manual_seed(1)
        other = m + 0.5 * torch.randn_like(m) * m.norm() / m.shape[-1] ** 0.5
        dr = norm(other) - r  # reachable: another input's output
        delta = residual_to_mlp(adapter, tok, [req], [""], layer, dr).double()
        torch.testing.assert_close(norm(m + delta), norm(other), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mlp_to_residual(adapter, tok, [req], [""], layer, delta).double(),
                                   norm(m + delta) - r, atol=1e-6, rtol=1e-4)
        dr = 0.3 * torch.randn_like(r) * r.norm() / r.shape[-1] ** 0.5  # in general not reachable
        delta = residual_to_mlp(adapter, tok, [req], [""], layer, dr).double()
    torch.testing.assert_close(norm(m + delta), _nearest_normed(norm, m, r + dr), atol=1e-5, rtol=1e-5)
    # no post-norm: both are the identity
    plain = ModelLayout(tiny_model("llama"))
    assert residual_to_mlp(plain, tok, [req], [""], layer, dr) is dr
    assert mlp_to_residual(plain, tok, [req], [""], layer, dr) is dr
    # and a MEMIT-style batch runs through them
    corpus = Corpus("w", ["the capital of france is paris", "beats music is owned by apple"] * 20)
    reqs = [req, EditRequest("{} is owned by", "france", "paris")]
    res = compute_edit(reqs, model.float(), tok, corpus, progress=False, mode="batch",
                       cfg=EditConfig(method="mlp", stats_samples=200, n_prefixes=2, steps=5, batch_layers=[0, 1]))
    res.delta.check_finite()
    assert len(res.delta.modules()) == 2


@pytest.mark.usefixtures("fp64_norms")
def test_spread_conversion_per_context_is_each_contexts_own():
    """With edit.batch_insert_keys "contexts" the spread asks each context (prefix) for its own
    residual change (n, n_prefixes, d); `residual_to_mlp` answers each from that context's own
    MLP output: reachable targets are met exactly, context by context, for two requests."""
    from factedit.editing.insert import at_token, residual_to_mlp

    tok, req, model, adapter, layer, norm, _ = _spread_setup()
    reqs = [req, EditRequest("{} is owned by", "france", "paris")]
    prefixes = ["", "the capital is paris .", "apple"]
    m = at_token(adapter, tok, reqs, prefixes, adapter.mlp(layer), "out", per_prefix=True).double()  # (2, 3, d)
    with torch.no_grad():
        torch.manual_seed(2)
        other = m + 0.5 * torch.randn_like(m) * m.norm(dim=-1, keepdim=True) / m.shape[-1] ** 0.5
        dr = norm(other) - norm(m)  # (2, 3, d), each context's own reachable change
        delta = residual_to_mlp(adapter, tok, reqs, prefixes, layer, dr).double()
        assert delta.shape == m.shape
        torch.testing.assert_close(norm(m + delta), norm(other), atol=1e-6, rtol=1e-5)


@pytest.mark.usefixtures("fp64_norms")
def test_near_zero_post_norm_gains_ask_a_bounded_change():
    """Gemma-3-270M's post-MLP norms have weight -1 (gain 0) in some dimensions and gains under
    1e-3 in others: the MLP cannot move the residual there (or barely). Dividing the wanted
    change by the frozen gain asked for a change ~1e4 times the MLP output there, which raised
    rms(m) and shrank every other dimension: the Gemma batch failed. `residual_to_mlp` asks for a
    bounded change whose output is the naive optimum (L-BFGS), much nearer the target than the
    frozen-gain inverse's; a MEMIT-style batch through such a layer stays finite."""
    from factedit.editing.insert import residual_to_mlp

    dead, tiny = [3], [5]
    tok, req, model, adapter, layer, norm, m = _spread_setup(dead, tiny)
    with torch.no_grad():
        r = norm(m)
        torch.manual_seed(1)
        dr = 0.1 * torch.randn_like(m) * m.norm() / m.shape[-1] ** 0.5
        delta = residual_to_mlp(adapter, tok, [req], [""], layer, dr).double()
        assert torch.isfinite(delta).all()
        assert float(delta.norm()) < 3 * float(m.norm())
        frozen = dr * torch.rsqrt(m.pow(2).mean(-1, keepdim=True) + norm.eps) ** -1 / (1 + norm.weight.double())
        frozen[:, dead] = 0.0  # the old pseudo-inverse: no change where the gain is exactly 0
        assert float(frozen.norm()) > 100 * float(m.norm())  # what the frozen gain asked for
        err, err_frozen = (norm(m + delta) - r - dr).norm(), (norm(m + frozen) - r - dr).norm()
        assert float(err) < 0.5 * float(err_frozen), (float(err), float(err_frozen))
    torch.testing.assert_close(norm(m + delta), _nearest_normed(norm, m, r + dr), atol=1e-5, rtol=1e-5)
    corpus = Corpus("w", ["the capital of france is paris", "beats music is owned by apple"] * 20)
    reqs = [req, EditRequest("{} is owned by", "france", "paris")]
    res = compute_edit(reqs, model.float(), tok, corpus, progress=False, mode="batch",
                       cfg=EditConfig(method="mlp", stats_samples=200, n_prefixes=2, steps=5, batch_layers=[0, 1]))
    res.delta.check_finite()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batch_contexts_insertion_is_the_weighted_least_squares_over_every_context(family):
    """edit.batch_insert_keys "contexts": one layer, no post-norm, so each context's residual
    is the request's fitted MLP change δᵢ and the update must be
        ΔW = (Σᵢⱼ w δᵢ kᵢⱼᵀ) (λC + Σᵢⱼ w kᵢⱼ kᵢⱼᵀ)⁻¹,  w = 1 / n_contexts,
    with kᵢⱼ read here by a plain hook, one prompt at a time (float64 solve; tolerance 1e-4
    relative: float32 keys in batches against one prompt). "mean" (MEMIT) reuses the same fit
    (``reuse_fit``) and gives another update; a fit of other settings is refused by name."""
    from factedit.analysis.spans import tokenize_with_subject
    from factedit.editing.values import context_prefixes
    from factedit.errors import FactEditError

    from .test_locate import word_tokenizer

    tok = word_tokenizer()
    tok.pad_token = "[UNK]"
    model = tiny_model(family).float()
    adapter = ModelLayout(model)
    corpus = Corpus("w", ["the capital of france is paris", "beats music is owned by apple"] * 20)
    reqs = [EditRequest("the capital of {} is", "beats music", "apple"),
            EditRequest("{} is owned by", "france", "paris")]
    cfg = EditConfig(method="mlp", stats_samples=200, n_prefixes=2, steps=5, batch_layers=[1], batch_lambda=50.0,
                     batch_insert_keys="contexts")
    res = compute_edit(reqs, model, tok, corpus, progress=False, mode="batch", cfg=cfg)
    layer, name = 1, adapter.module_name(1, adapter.spec.mlp_out)
    prefixes = context_prefixes(tok, list(corpus.texts), cfg)
    keys = []  # (n, m, in), one forward pass per prompt
    for r in reqs:
        for p in prefixes:
            tp = tokenize_with_subject(tok, f"{p} {r.filled_prompt}" if p else r.filled_prompt, r.subject)
            seen = []
            h = adapter.mlp_out(layer).register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0][0]))
            with torch.no_grad():
                model(input_ids=torch.tensor([tp.input_ids]))
            h.remove()
            keys.append(seen[0][tp.last_subject].double())
    K = torch.stack(keys).reshape(len(reqs), len(prefixes), -1)
    C, _ = second_moments(adapter, tok, corpus, [("mlp", layer)], model_fingerprint(model), 200, progress=False)
    w = 1.0 / len(prefixes)
    D = res.fit.mlp.double()  # (n, d)
    lhs = 50.0 * regularised(C[("mlp", layer)], cfg.ridge) + w * torch.einsum("nmi,nmj->ij", K, K)
    rhs = w * torch.einsum("nd,nmi->di", D, K)  # (d, in)
    want = torch.linalg.solve(lhs, rhs.T).T
    got = res.delta.dense(name).double()  # (out, in) whatever the module's layout (GPT-2's Conv1D)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # MEMIT's mean key on the same fit: no refit, another update
    mean = compute_edit(reqs, model, tok, corpus, progress=False, mode="batch",
                        cfg=dataclasses.replace(cfg, batch_insert_keys="mean"), reuse_fit=res)
    assert mean.fit is res.fit and not torch.allclose(mean.delta.dense(name), res.delta.dense(name))
    with pytest.raises(FactEditError, match=r"fit settings differ \(steps\)"):
        compute_edit(reqs, model, tok, corpus, progress=False, mode="batch",
                     cfg=dataclasses.replace(cfg, steps=6), reuse_fit=res)


def test_value_fit_batches_stay_within_the_memory_budget():
    """fit_chunk_size: the demo model keeps 64 requests per fit batch; SmolLM2's shape (30 layers,
    576 wide, d_ff 1536) with 21 rows a request gets 6 under the default 4 GiB (64 at once
    took 22 GiB); a smaller budget gives fewer, never 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from factedit.editing.values import fit_chunk_size

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=64)
    with torch.device("meta"):
        big = ModelLayout(LlamaForCausalLM(cfg))
    per_row = 30 * (16 * 576 + 4 * 1536) * 4 * 16
    assert fit_chunk_size(big, 21, EditConfig()) == 4 * 2**30 // per_row // 21 == 6
    assert fit_chunk_size(big, 21, EditConfig(fit_memory_gib=0.01)) == 1
    assert fit_chunk_size(big, 21, EditConfig(fit_memory_gib=1000.0)) == 64
    with pytest.raises(Exception, match="fit_memory_gib must be positive"):
        EditConfig(fit_memory_gib=0).validate()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_values_are_written_at_the_attended_subject_token(family):
    """edit.head_position "attended": a head's value is written at the subject token it attends
    to most from the last position (read here from the model's own attention weights), and the
    update changes that head's value there by the same delta in every context (the insertion
    for every context's key), not at the subject's last token."""
    from factedit.analysis.circuit import ExtractionHead
    from factedit.analysis.locate import locate
    from factedit.analysis.spans import tokenize_with_subject
    from factedit.editing.values import context_prefixes

    from .test_locate import word_tokenizer

    torch.manual_seed(0)
    model = tiny_model(family).float()
    tok = word_tokenizer()
    tok.pad_token = tok.eos_token = "[UNK]"
    adapter = ModelLayout(model)
    req = EditRequest("the capital of {} is", "beats music", "apple")
    ids = torch.tensor([tokenize_with_subject(tok, req.filled_prompt, req.subject).input_ids])
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions  # L x (1, H, T, T)
    # a head that attends more to "beats" (position 3) than to "music" (4), the last subject token
    la, h = next((la, h) for la in range(adapter.n_layers) for h in range(adapter.n_heads)
                 if att[la][0, h, -1, 3] > att[la][0, h, -1, 4] + 0.05)
    circuit = locate(req.prompt, req.subject, model=model, tokenizer=tok)
    circuit.extraction_heads = [ExtractionHead(la, h, 0.5, 1, None)]
    corpus = Corpus("w", ["the capital of france is paris", "beats music is owned by apple"] * 20)
    cfg = EditConfig(method="heads", head_position="attended", max_heads=1, stats_samples=200, n_prefixes=2,
                     steps=5)
    res = compute_edit([req], model, tok, corpus, cfg=cfg, circuits=[circuit], progress=False)
    assert res.plans[0].heads == [(la, h)] and res.plans[0].head_offsets == [-1]

    rows = adapter.value_rows(la, adapter.kv_head(h))

    def values(prompt: str) -> tuple[torch.Tensor, tuple[int, int]]:
        tp = tokenize_with_subject(tok, prompt, req.subject)
        got = {}
        hook = adapter.v_proj(la).register_forward_hook(lambda m, a, o: got.update(v=o[0].clone()))
        with torch.no_grad():
            model(input_ids=torch.tensor([tp.input_ids]))
        hook.remove()
        return got["v"][:, rows], tp.subject_span  # (T, head_dim)

    prefixed = f"{context_prefixes(tok, list(corpus.texts), cfg)[1]} {req.filled_prompt}"
    before = {p: values(p) for p in (req.filled_prompt, prefixed)}
    with applied(model, res.delta):
        after = {p: values(p)[0] for p in before}
    change = {p: after[p] - v for p, (v, _span) in before.items()}
    (s0, s1), (t0, _t1) = before[req.filled_prompt][1], before[prefixed][1]
    delta = change[req.filled_prompt][s0]  # at "beats", the attended token
    assert float(delta.norm()) > 1e-3
    torch.testing.assert_close(change[prefixed][t0], delta, atol=1e-4, rtol=1e-3)  # every context alike
    assert float((change[req.filled_prompt][s1 - 1] - delta).norm()) > 1e-2 * float(delta.norm())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attended_offsets_skip_the_first_token(family):
    """A subject at the start of the prompt: its first token is also the prompt's first, where
    heads park attention (the sink), and is never chosen; the choice is the naive argmax of the
    attention weights over the subject's other tokens, for every head."""
    from factedit.editing.plan import attended_offsets

    from .test_locate import word_tokenizer

    torch.manual_seed(0)
    model = tiny_model(family).float()
    tok = word_tokenizer()
    adapter = ModelLayout(model)
    req = EditRequest("{} is owned by", "the capital of france", "apple")  # subject = tokens 0..3
    ids = torch.tensor([tok(req.filled_prompt)["input_ids"]])
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions  # L x (1, H, T, T)
    heads = [(la, h) for la in range(adapter.n_layers) for h in range(adapter.n_heads)]
    want = [int(att[la][0, h, -1, 1:4].argmax()) + 1 - 3 for la, h in heads]
    assert attended_offsets(adapter, tok, req, heads) == want and min(want) >= -2
