"""Sequences of edits: the layer sweep's insertion maths, a sequence's folder (a PEFT adapter
plus its history), continuing it, and undoing its last edits bit for bit."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from factedit.editing.api import edit
from factedit.editing.config import EditConfig
from factedit.editing.history import SequenceError, compose, load_sequence, undo
from factedit.editing.requests import EditRequest
from factedit.editing.sequential import SequenceState, held_for, null_projector, sequential_row
from factedit.editing.weights import WeightDelta

FAST = dict(stats_samples=4000, n_prefixes=4, lookup_position="last", sequential_strategy="refit",
            sequential_layers=[0, 1, 2],
            sequential_lambda=300.0, held_prompts=1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def test_sequential_row_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 10, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 10, dtype=torch.float64)
    C = X.T @ X / 400  # eigenvalues over 4 orders of magnitude
    Kp = torch.randn(4, 10, generator=g, dtype=torch.float64)
    K = torch.randn(3, 10, generator=g, dtype=torch.float64)  # the request's key, then 2 held keys
    r = torch.randn(6, generator=g, dtype=torch.float64)
    cfg = EditConfig(sequential_lambda=2.0, sequential_keep=3.0, ridge=0.0)
    a = sequential_row(C, Kp.T @ Kp, K, cfg)
    # naive: minimise ||dW K^T - [r, 0, 0]||^2 + 3 ||dW Kp^T||^2 + 2 tr(dW C dW^T)
    R = torch.stack([r, torch.zeros(6, dtype=r.dtype), torch.zeros(6, dtype=r.dtype)], 1)  # (out, 3)
    want = torch.linalg.solve(2.0 * C + 3.0 * Kp.T @ Kp + K.T @ K, K.T @ R.T).T  # (out, in)
    torch.testing.assert_close(r[:, None] * a[None], want)
    # AlphaEdit: with a projector P the update is zero on everything P removes
    P = null_projector(C, 1e-2)
    assert 0 < int(torch.linalg.matrix_rank(P)) < 10
    a = sequential_row(C, Kp.T @ Kp, K, cfg, P)
    torch.testing.assert_close(a @ (torch.eye(10, dtype=P.dtype) - P), torch.zeros(10, dtype=P.dtype))
    S = (3.0 * Kp.T @ Kp + K.T @ K) @ P + torch.eye(10, dtype=P.dtype)
    torch.testing.assert_close(a, (K[:1] @ P @ torch.linalg.inv(S))[0])


def test_each_pass_of_the_sweep_solves_with_its_own_lambda(demo, monkeypatch):
    """sequential_lambda_decay: pass p inserts with λ / decay**p, whatever the passes before
    took (stop_nll 0: no request is ever done, so every pass runs at every layer)."""
    import factedit.editing.sequential as seqmod
    from factedit.editing.edit import compute_edit
    from factedit.editing.stats import world_corpus

    model, tok, world = demo
    seen: list[float] = []
    real = seqmod.sequential_row

    def spy(C, gram, keys, cfg, proj=None, lam=None):
        seen.append(lam)
        return real(C, gram, keys, cfg, proj, lam)

    monkeypatch.setattr(seqmod, "sequential_row", spy)
    cfg = EditConfig(**{**FAST, "sequential_layers": [0, 1], "sequential_passes": 3, "sequential_lambda": 300.0,
                        "sequential_lambda_decay": 10.0, "stop_nll": 0.0, "steps": 2})
    res = compute_edit(_requests(world, 1), model, tok, world_corpus(world), cfg=cfg, mode="sequential",
                       progress=False)
    assert seen == pytest.approx([300.0, 300.0, 30.0, 30.0, 3.0, 3.0])
    assert res.step_layers == [[0, 1, 0, 1, 0, 1]]
    # the row itself: lam overrides the config's λ and nothing else
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 6, generator=g, dtype=torch.float64)
    K = torch.randn(2, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(real(X.T @ X, None, K, cfg, lam=30.0),
                               real(X.T @ X, None, K, EditConfig(**{**FAST, "sequential_lambda": 30.0})))
    with pytest.raises(Exception, match="sequential_lambda_decay must be positive"):
        EditConfig(sequential_lambda_decay=0.0).validate()


def test_compose_is_exact_and_depends_on_the_prefix_only():
    g = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(7):
        d = WeightDelta()
        d.add("m", torch.randn(3, 1, generator=g), torch.randn(1, 5, generator=g))
        steps.append(d)
    low = compose(steps[:2], False)  # rank 2 <= min(3, 5): the factors themselves
    assert low.factors["m"][0][0].shape == (3, 2)
    full = compose(steps, False)  # rank 7 > 3: the float64 sum, stored at rank 3
    b, a = full.factors["m"][0]
    assert torch.equal(b, torch.eye(3)) and torch.equal(b @ a, a)
    want = sum(st.dense("m").double() for st in steps)
    torch.testing.assert_close(a.double(), want, atol=1e-6, rtol=1e-6)
    assert torch.equal(compose(steps[:5], False).dense("m"), compose(steps[:5], False).dense("m"))


def test_held_prompts_ask_earlier_subjects_never_an_edited_pair():
    st = SequenceState(subjects=[("{} was born in", "A"), ("{} plays", "B"), ("{} was born in", "C")])
    req = EditRequest("{} plays", "D", "chess")
    held = held_for(req, st, 5, seed=0, index=3)
    assert sorted(h.subject for h in held) == ["A", "C"]  # B already has "{} plays" edited
    assert all(h.template == "{} plays" for h in held)
    assert held_for(req, SequenceState(), 1, 0, 0) == []


def _requests(world, n, start=300):
    out = []
    rels = list(world.relations)
    for i in range(n):
        e, rid = world.entities[start + i], rels[i % len(rels)]
        rel = world.relations[rid]
        new = next(a for a in rel.attributes if a != e.facts[rid])
        out.append(EditRequest(rel.templates[0], e.name, new, e.facts[rid]))
    return out


def _folder_state(folder):
    return ((folder / "adapter_model.safetensors").read_bytes(), (folder / "adapter_config.json").read_bytes(),
            load_file(folder / "merged" / "model.safetensors"))


def test_undo_restores_the_sequence_bit_for_bit(demo, tmp_path):
    model, tok, world = demo
    reqs = _requests(world, 5)
    cfg = EditConfig(**FAST)
    out = tmp_path / "seq"
    edit(reqs[:3], model=model, tokenizer=tok, config=cfg, mode="sequential", out=out, merge=True, progress=False)
    before = _folder_state(out)
    seq = load_sequence(out)
    assert len(seq.steps) == 3 and all(st.modules() for st in seq.steps)
    # a normal PEFT adapter: peft loads it and gives the merged checkpoint's logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = tok(reqs[0].filled_prompt, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model.name_or_path)
    peft_logits = PeftModel.from_pretrained(base, str(out))(input_ids=ids).logits
    merged_logits = AutoModelForCausalLM.from_pretrained(out / "merged")(input_ids=ids).logits
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-4, rtol=1e-4)
    # continue the sequence, then undo what was added: the folder's model comes back bit for bit
    edit(reqs[3:], model=model, tokenizer=tok, config=cfg, out=out, merge=True, progress=False, append=True)
    grown = load_sequence(out)
    assert len(grown.steps) == 5 and [r["subject"] for r in grown.manifest["requests"]] == [r.subject for r in reqs]
    for i in range(3):  # the first steps are kept as they were
        for name in seq.steps[i].modules():
            assert torch.equal(seq.steps[i].dense(name), grown.steps[i].dense(name))
    # the continued edits kept the earlier ones' keys: the state holds every step's keys
    assert all(grown.state().counts[s] == 5 * 2 - 1 for s in grown.state().counts)  # 5 edits + 4 held prompts
    assert _folder_state(out)[0] != before[0]
    undo(out, 2, model, tok)
    after = _folder_state(out)
    assert after[0] == before[0] and after[1] == before[1]
    assert after[2].keys() == before[2].keys()
    assert all(torch.equal(after[2][k], before[2][k]) for k in before[2])
    assert len(load_sequence(out).manifest["requests"]) == 3
    # undoing every edit, or more, is refused (the base model is unchanged): nothing is written
    with pytest.raises(SequenceError, match="undo 1 to 2"):
        undo(out, 3, model, tok)
    assert _folder_state(out)[0] == before[0]
    # the command line: `factedit edit --undo K --out DIR` (merged/ rebuilt from the demo model)
    from click.testing import CliRunner

    from factedit.cli import main

    bad = CliRunner().invoke(main, ["edit", "--undo", "1", "--out", str(out), "--subject", "x"])
    assert bad.exit_code == 2 and "--undo takes no requests" in bad.output
    ok = CliRunner().invoke(main, ["edit", "--undo", "1", "--out", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "undid the last 1 of 3 edits" in ok.output and len(load_sequence(out).steps) == 2


def test_undo_and_append_refuse_a_folder_that_is_not_a_sequence(demo, tmp_path):
    model, tok, world = demo
    out = tmp_path / "single"
    edit(_requests(world, 1)[0], model=model, tokenizer=tok, config=EditConfig(**FAST), out=out, progress=False)
    with pytest.raises(SequenceError, match="does not hold a sequence"):
        undo(out, 1)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(SequenceError, match="does not hold a sequence"):
        edit(_requests(world, 2)[1], model=model, tokenizer=tok, config=EditConfig(**FAST), out=copy,
             append=True, progress=False)



def test_drifted_scores_each_edit_like_a_naive_forward(demo):
    """The re-assertion check: each earlier edit's target NLL, the mean over the fit's contexts,
    equals a plain forward pass per context (float32 rounding of padded batches: 1e-4); only
    edits that once held (NLL at or below the threshold when their sweep ended) are reported."""
    from factedit.analysis.spans import target_token_ids
    from factedit.editing.stats import world_corpus
    from factedit.editing.values import context_prefixes
    from factedit.models.adapter import ModelLayout

    model, tok, world = demo
    reqs = _requests(world, 4)
    cfg = EditConfig(**{**FAST, "sequential_reassert_nll": 0.5})
    prefixes = context_prefixes(tok, list(world_corpus(world).texts), cfg)
    naive = []
    with torch.no_grad():
        for r in reqs:
            nll = []
            for p in prefixes:
                text = f"{p} {r.filled_prompt}" if p else r.filled_prompt
                ids = tok(text, return_tensors="pt")["input_ids"]
                t = target_token_ids(tok, text, r.target_new)[0]
                nll.append(-model(input_ids=ids).logits[0, -1].log_softmax(-1)[t].item())
            naive.append(sum(nll) / len(nll))
    st = SequenceState(edited=[(r, "last", after) for r, after in zip(reqs, [0.1, 0.1, 5.0, 0.5])])
    got = seqmod().drifted(ModelLayout(model), tok, prefixes, st, 0, cfg)
    assert [i for i, _ in got] == [0, 1, 3]  # edit 2 never held; new targets: every NLL is high
    for i, nll in got:
        assert nll == pytest.approx(naive[i], abs=1e-4)
    assert min(naive) > 0.5


def seqmod():
    import factedit.editing.sequential as mod

    return mod


def test_reasserted_edits_belong_to_the_step_that_swept_them_again(demo, monkeypatch, tmp_path):
    """sequential_reassert_every: after every N-th edit, the edits the check reports are swept
    again; their updates and keys join that edit's step, the manifest records them, and a
    continued sequence knows their new NLL. Undoing that step removes them with it."""
    mod = seqmod()
    model, tok, world = demo
    reqs = _requests(world, 4)
    calls: list[int] = []

    def fake_drifted(adapter, tok_, prefixes, state, layer, cfg):
        calls.append(len(state.edited))
        return [(0, 9.0)] if len(state.edited) == 2 else []

    monkeypatch.setattr(mod, "drifted", fake_drifted)
    cfg = EditConfig(**{**FAST, "sequential_reassert_every": 2})
    out = tmp_path / "seq"
    res = edit(reqs[:3], model=model, tokenizer=tok, config=cfg, mode="sequential", out=out, progress=False)
    assert calls == [2]
    again = res.nll[1]["reasserted"]
    assert [a["edit"] for a in again] == [0] and again[0]["nll"] == 9.0
    assert "reasserted" not in res.nll[0] and "reasserted" not in res.nll[2]
    # step 1 holds edit 1's update and edit 0's again: rank 2 or more at a layer both wrote
    own = len(res.step_layers[1]) + len(again[0]["layers"])
    assert sum(b.shape[1] for f in res.steps[1].factors.values() for b, _ in f) == own
    # its keys: edit 1's and edit 0's, each with one held prompt (its template asked about the other)
    assert all(k.shape[0] == 2 + 2 for k in res.step_keys[1].values())
    st = load_sequence(out).state()
    assert st.edited[0][2] == pytest.approx(again[0]["after_fit"])
    assert [e[0].subject for e in st.edited] == [r.subject for r in reqs[:3]]
    assert [e[1] for e in st.edited] == ["last"] * 3
    # undoing the last 2 steps removes the re-assertion with them: the first step alone remains
    before = compose(res.steps[:1], res.delta.conv1d)
    undo(out, 2, model, tok)
    kept = load_sequence(out)
    for name in before.modules():
        assert torch.equal(kept.delta().dense(name), before.dense(name))
    assert load_sequence(out).state().edited[0][2] == pytest.approx(res.nll[0]["after_fit"])


def test_reassertion_runs_on_the_demo_model(demo):
    """Without a stand-in check: every edit triggers one, and the sequence completes with each
    reported edit swept again (no assertion on how many drift: that is the benchmark's job)."""
    from factedit.editing.edit import compute_edit
    from factedit.editing.stats import world_corpus

    model, tok, world = demo
    cfg = EditConfig(**{**FAST, "sequential_reassert_every": 1, "sequential_reassert_nll": 0.7})
    res = compute_edit(_requests(world, 3), model, tok, world_corpus(world), cfg=cfg, mode="sequential",
                       progress=False)
    assert all("reasserted" in n for n in res.nll)
    for n in res.nll:
        for a in n["reasserted"]:
            assert a["nll"] > 0.7
    with pytest.raises(Exception, match="sequential_reassert_every must be zero or more"):
        EditConfig(sequential_reassert_every=-1).validate()


@pytest.mark.parametrize("every,window", [(10, 30), (5, 7), (1, 3)])
def test_the_check_window_rotates_over_every_earlier_edit(every, window):
    """sequential_reassert_window W: each check reads W earlier edits (all while there are no
    more), and the checks in turn cover every edit, each about once per n / W checks; a
    window of 0 reads all of them, as before."""
    checked = seqmod().checked
    cfg = EditConfig(**{**FAST, "sequential_reassert_every": every, "sequential_reassert_window": window})
    seen: dict[int, int] = {}  # edit -> the last check that read it
    for n in range(every, 10 * every * window + 1, every):
        idx = checked(n, cfg)
        assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
        assert len(idx) == min(n, window)
        for i in idx:
            seen[i] = n
        # no edit goes unread (since it was made, or since its last read) for longer than about
        # two passes of the cursor over the sequence (a pass: n / W checks of `every` edits)
        stale = [i for i in range(n) if n - seen.get(i, i) > 2 * every * n / window + every]
        assert not stale, (n, stale[:5])
    assert checked(500, EditConfig(**{**FAST, "sequential_reassert_every": every})) == list(range(500))


def test_drifted_reads_only_the_check_window(demo):
    """With a window, the check scores only the edits ``checked`` names: every edit here
    drifted (new targets, NLL far above 0.5), so what it reports is exactly the window."""
    from factedit.editing.stats import world_corpus
    from factedit.editing.values import context_prefixes
    from factedit.models.adapter import ModelLayout

    model, tok, world = demo
    reqs = _requests(world, 10)
    cfg = EditConfig(**{**FAST, "n_prefixes": 1, "sequential_reassert_nll": 0.5, "sequential_reassert_every": 5,
                        "sequential_reassert_window": 3})
    prefixes = context_prefixes(tok, list(world_corpus(world).texts), cfg)
    st = SequenceState(edited=[(r, "last", 0.1) for r in reqs])
    got = [i for i, _ in seqmod().drifted(ModelLayout(model), tok, prefixes, st, 0, cfg)]
    assert got == seqmod().checked(10, cfg) and len(got) == 3


def test_a_kept_sequence_continued_from_its_folder_keeps_the_earlier_keys(demo, tmp_path):
    """``kept`` (one rank-one update per edit, solved against C + KₚᵀKₚ/λ): a sequence edited
    in two calls, the second continuing the folder (``append``), writes the same updates as
    one call with every request, because the folder's history hands the earlier edits' keys to
    the later ones. Tolerance 1e-4 relative: the folder stores keys in float32 and the later
    fits run on the folder's composed update instead of the update kept in memory."""
    model, tok, world = demo
    reqs = _requests(world, 3)
    cfg = EditConfig(**{**FAST, "sequential_strategy": "kept"})
    edit(reqs, model=model, tokenizer=tok, config=cfg, mode="sequential", out=tmp_path / "one", progress=False)
    edit(reqs[:1], model=model, tokenizer=tok, config=cfg, mode="sequential", out=tmp_path / "two", progress=False)
    edit(reqs[1:], model=model, tokenizer=tok, config=cfg, out=tmp_path / "two", progress=False, append=True)
    one, two = load_sequence(tmp_path / "one"), load_sequence(tmp_path / "two")
    assert one.state().counts == two.state().counts and sum(one.state().counts.values()) >= 3
    for a, b in zip(one.steps, two.steps, strict=True):
        assert a.modules() == b.modules()
        for name in a.modules():
            torch.testing.assert_close(b.dense(name), a.dense(name), atol=1e-6, rtol=1e-4)
