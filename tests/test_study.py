"""`factedit study` on the demo world: aggregates against naive recomputations, the raw
attribute rate against a hand projection, the knockout against the paper's one-pass-per-row
procedure, and the CLI (files written, bad input exits 2)."""

import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from factedit.analysis.attribute_rate import keep_token
from factedit.analysis.circuit import LocateConfig
from factedit.analysis.knockout import attention_knockout, window_layers
from factedit.analysis.spans import tokenize_with_subject
from factedit.audit.dataset import world_facts
from factedit.cli import main
from factedit.models.adapter import ModelLayout
from factedit.studies.paper import (
    StudyOptions,
    first_below,
    jaccard,
    primary_facts,
    related_set,
    relation_first,
    run_study,
)

K = 10  # attribute top-k


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The demo model is tiny: one thread is faster, and much faster on busy shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg():
    return LocateConfig(knockout_window=3, sublayer_window=3, attribute_top_k=K)


@pytest.fixture(scope="module")
def study(one_thread, demo, tmp_path_factory):
    model, tok, world = demo
    out = tmp_path_factory.mktemp("study") / "out"
    s = run_study(world_facts(world), model=model, tokenizer=tok, config=_cfg(), limit=5, world=world,
                  options=StudyOptions(paraphrases=1), dataset_name="world", out=out)
    return s, out


def test_pure_helpers():
    assert first_below([0, -10, -25, -60], -20) == 2
    assert first_below([0, -10, -25, -60], -50) == 3
    assert first_below([0, -10], -20) is None
    assert relation_first({"non_subject": [-30, 0], "subject": [0, -30]}, -20) is True
    assert relation_first({"non_subject": [0, 0], "subject": [0, -30]}, -20) is False
    assert relation_first({"non_subject": [-30, 0], "subject": [0, 0]}, -20) is True
    assert relation_first({"non_subject": [0, 0], "subject": [0, 0]}, -20) is None
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) is None


def test_flow_against_naive_mean_band_and_crossings(study):
    s, _out = study
    recs = s.records
    assert len(recs) == s.summary["facts_known"] >= 3
    fl = s.summary["flow"]
    n = len(recs)
    for src in ("subject", "non_subject", "last"):
        rows = [r["knockout"][src] for r in recs]
        mean = [sum(col) / n for col in zip(*rows)]
        sd = [math.sqrt(sum((x - m) ** 2 for x in col) / (n - 1)) for col, m in zip(zip(*rows), mean)]
        for a, b in zip(fl["curves"][src]["mean"], mean):
            assert a == pytest.approx(b, abs=1e-9)
        for a, b in zip(fl["curves"][src]["band95"], sd):
            assert a == pytest.approx(1.96 * b / math.sqrt(n), abs=1e-9)
        for t in (-20, -50):
            naive = None
            for la, v in enumerate(mean):
                if v < t:
                    naive = la
                    break
            assert fl["first_below"][src][str(t)] == naive
    # relation before subject, per fact, by hand
    verdicts = []
    for r in recs:
        rel = [la for la, v in enumerate(r["knockout"]["non_subject"]) if v < -20]
        sub = [la for la, v in enumerate(r["knockout"]["subject"]) if v < -20]
        if rel or sub:
            verdicts.append((rel[0] if rel else 99) < (sub[0] if sub else 99))
    rb = fl["relation_before_subject"]["-20"]
    assert rb["decided"] == len(verdicts)
    assert rb["share"] == (pytest.approx(sum(verdicts) / len(verdicts)) if verdicts else None)


def test_knockout_records_match_the_paper_procedure(study, demo):
    """The record's curves are the paper's: one full forward pass per blocked window."""
    model, tok, _world = demo
    s, _ = study
    r = s.records[0]
    tp = tokenize_with_subject(tok, r["prompt"], r["subject"])
    naive = attention_knockout(ModelLayout(model), tp, 3, method="naive")
    for src in ("subject", "non_subject", "last"):
        for a, b in zip(r["knockout"][src], naive.curves.curve(src)):
            assert a == pytest.approx(b, abs=1e-3)


@torch.no_grad()
def test_raw_attribute_rate_against_a_hand_projection(study, demo):
    model, tok, world = demo
    s, _ = study
    r = s.records[0]
    tp = tokenize_with_subject(tok, r["prompt"], r["subject"])
    related = related_set(tok, list(world.entity(r["subject"]).facts.values()), r["subject"])
    assert related
    hs = model(input_ids=torch.tensor([tp.input_ids]), output_hidden_states=True).hidden_states
    w_u = model.get_output_embeddings().weight  # (V, d)
    keep = [keep_token(tok.decode([i])) for i in range(w_u.shape[0])]
    L = model.config.n_layer
    for la in range(L):  # hidden_states[la] < L is the raw block input; the last one is after the final norm
        logits = hs[la][0, tp.last_subject] @ w_u.T
        order = [int(i) for i in logits.argsort(descending=True) if keep[int(i)]][:K]
        want = sum(i in related for i in order) / K
        assert r["attribute_rate"]["raw"]["last_subject"][la] == pytest.approx(want, abs=1e-9), la


def test_early_and_upper_windows_and_their_drops(study, demo):
    model, _tok, _world = demo
    s, _ = study
    em = s.summary["early_mlp"]
    L = model.config.n_layer
    assert em["early_window"] == [0, 1, 2]
    read = em["read_layer"]
    assert em["upper_window"][-1] == read - 1 and len(em["upper_window"]) == 3
    c_early = next(c for c in range(L) if list(window_layers(c, 3, L)) == em["early_window"])
    drops = [r["sublayer_knockout"]["base_attribute_rate"] - r["sublayer_knockout"]["mlp_attribute_rate"][c_early]
             for r in s.records]
    assert em["early"]["attribute_rate_drop"] == pytest.approx(sum(drops) / len(drops), abs=1e-9)


def test_paraphrase_pairs_and_robustness(study):
    s, _ = study
    pa = s.summary["paraphrase"]
    assert pa["pairs"] == len(s.paraphrases) >= 1
    by_prompt = {r["prompt"]: r for r in s.records}
    for p in s.paraphrases:
        a = by_prompt[p["original"]]
        assert p["paraphrase"] != p["original"]
        assert a["subject"] in p["paraphrase"]
    js = [p["head_jaccard"] for p in s.paraphrases if p["head_jaccard"] is not None]
    assert pa["head_jaccard"]["both_empty_pairs"] == len(s.paraphrases) - len(js)
    if js:
        assert pa["head_jaccard"]["mean"] == pytest.approx(sum(js) / len(js))
    assert pa["robustness"]  # the audit's robustness field, filled from the same prompts
    # no bridge relation in the demo world: no two-hop chain, and none invented
    assert s.summary["two_hop"]["bridge_facts"] == 0 and s.chains == []


def test_outputs_written(study):
    s, out = study
    data = json.loads((out / "study.json").read_text())
    assert data["format"] == "factedit.study/1"
    assert len(data["facts"]) == s.summary["facts_known"]
    assert data["related_source"] == "world"
    for name in ("knockout_bands.png", "attribute_rate.png", "attribute_rate_raw.png", "extraction_rate.png",
                 "early_mlp.png", "table.md"):
        assert (out / name).stat().st_size > 0, name
    keys = {r["key"] for r in data["table"]}
    assert {"relation_before_subject", "mhsa_extraction_share", "early_mlp_rate_drop",
            "paraphrase_head_jaccard"} <= keys


def test_limit_counts_subject_relation_groups(demo):
    _model, _tok, world = demo
    facts = world_facts(world)
    prim = primary_facts(facts, 3)
    assert len(prim) == 3 and len({f.group for f in prim}) == 3


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_per_stage_on_a_terminal_only(demo, monkeypatch):
    model, tok, world = demo
    tty = _TTY()
    monkeypatch.setattr(sys, "stderr", tty)
    args = dict(model=model, tokenizer=tok, config=_cfg(), limit=1, world=world,
                options=StudyOptions(related="model", description_tokens=4, paraphrases=1, two_hop=False))
    run_study(world_facts(world), **args, progress=False)
    assert tty.getvalue() == ""
    run_study(world_facts(world), **args)
    for stage in ("checking which facts the model knows", "describing subjects", "locating known facts",
                  "locating paraphrases"):
        assert stage in tty.getvalue(), stage


def test_cli_study_writes_and_refuses_bad_input(tmp_path):
    out = tmp_path / "st"
    res = CliRunner().invoke(main, ["study", "--out", str(out), "--limit", "2", "--paraphrases", "0", "--no-two-hop",
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "paper GPT-2 XL" in res.output
    assert (out / "study.json").is_file() and (out / "knockout_bands.png").is_file()
    res = CliRunner().invoke(main, ["study", "--out", str(out), "--limit", "2"])  # not empty
    assert res.exit_code == 2 and "error:" in res.output
    for args in (["--limit", "0"], ["--related", str(tmp_path / "missing.json")], ["--paraphrases", "-1"]):
        res = CliRunner().invoke(main, ["study", "--out", str(tmp_path / "new"), *args])
        assert res.exit_code == 2 and "error:" in res.output, args
        assert not Path(tmp_path / "new").exists()


def test_audit_paraphrases_fill_robustness(demo, tmp_path):
    """`audit --paraphrases 1`: each fact is followed by its relation's other template in the
    dataset, in its group, and the summary's robustness field is filled from those pairs."""
    from factedit.audit.dataset import load_facts, with_paraphrases

    _model, _tok, world = demo
    rows = []
    for i, e in enumerate(world.entities[:2]):  # each relation through two templates across the entities
        for j, (rid, rel) in enumerate(list(world.relations.items())[:2]):
            rows.append({"subject": e.name, "attribute": e.facts[rid], "relation_id": rid,
                         "template": rel.templates[(i + j) % 2]})
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    facts = with_paraphrases(load_facts(path), 1)
    assert [f.index for f in facts] == list(range(len(facts))) and len(facts) == 2 * len(rows)
    for a, b in zip(facts[::2], facts[1::2]):
        assert a.group == b.group and a.prompt != b.prompt and a.subject in b.prompt
    out = tmp_path / "audit"
    res = CliRunner().invoke(main, ["audit", "--dataset", str(path), "--paraphrases", "1", "--out", str(out),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["facts"] == 2 * len(rows)
    assert s["robustness"], s["robustness"]
    res = CliRunner().invoke(main, ["audit", "--dataset", str(path), "--paraphrases", "-1", "--out", str(out)])
    assert res.exit_code == 2 and "error:" in res.output


def test_model_descriptions_batched_equal_one_at_a_time(demo):
    """The offline subject text (--related model): left-padded batches give what each subject's
    own greedy generation gives."""
    from factedit.studies.paper import describe_subjects

    model, tok, world = demo
    names = [world.entities[0].name, world.entities[1].name + " Jr", world.entities[2].name]
    batched = describe_subjects(model, tok, names, max_new_tokens=6, batch=3)
    for n in names:
        assert batched[n] == describe_subjects(model, tok, [n], max_new_tokens=6, batch=1)[n], n
    assert all(isinstance(v, str) and v for v in batched.values())


def test_related_file_gives_the_subject_texts(demo, tmp_path):
    """--related FILE: the attribute rate uses the file's text for each subject (here the
    world's attributes written out, so the rates equal the world source's)."""
    model, tok, world = demo
    facts = world_facts(world)
    prim = primary_facts(facts, 2)
    path = tmp_path / "texts.json"
    path.write_text(json.dumps({f.subject: " ".join(world.entity(f.subject).facts.values()) for f in prim}))
    opts = dict(model=model, tokenizer=tok, config=_cfg(), limit=2, world=world)
    got = run_study(facts, options=StudyOptions(related=str(path), paraphrases=0, two_hop=False), **opts)
    ref = run_study(facts, options=StudyOptions(related="world", paraphrases=0, two_hop=False), **opts)
    assert got.summary["related_source"] == f"file:{path}"
    assert got.summary["related_facts"] == 2
    for a, b in zip(got.records, ref.records):
        assert a["attribute_rate"]["logit_lens"] == b["attribute_rate"]["logit_lens"]
