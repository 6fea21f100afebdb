"""Verify: metrics against a hand computation, and from the CLI a real edit passes while a no-op,
a same-size noise and a subject-blind edit fail."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from factedit.cli import main
from factedit.editing.config import EditConfig
from factedit.editing.edit import compute_edit
from factedit.editing.export import parse_peft_key, peft_key, save_edit
from factedit.editing.requests import EditRequest
from factedit.editing.stats import world_corpus
from factedit.verify import metrics


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))


def test_teacher_forced_nll_matches_a_hand_computation(demo):
    model, tok, _ = demo
    prompt, target = "Roric Dunnford was born in", "Madrid Paris"
    nll, ids, argmax = metrics.teacher_forced(model, tok, [prompt, "x"], [target, "Paris"])
    p_ids = tok(prompt)["input_ids"]
    t_ids = tok.encode(" " + target)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].log_softmax(-1)
    want = -sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(t_ids)) / len(t_ids)
    assert ids[0] == t_ids and nll[0] == pytest.approx(want, abs=1e-5)
    assert argmax[0] == [int(logp[len(p_ids) - 1 + j].argmax()) for j in range(len(t_ids))]


def test_portability_scores_each_consequence_by_hand(demo):
    """(f): a consequence ports when the top-1 after its prompt is the first token of " new",
    and moved when new beats old by mean per-token NLL; both recomputed here from the logits."""
    from factedit.verify.checks import Consequence, _consequences

    model, tok, _ = demo
    qs = [Consequence("Roric Dunnford was born in", old, new) for old, new in
          (("Madrid", "Paris"), ("Paris", "Madrid"), ("Tokyo", "Madrid Paris"))]
    got = _consequences(model, tok, qs)

    def mean_nll(prompt, target):
        p_ids, t_ids = tok(prompt)["input_ids"], tok.encode(" " + target)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].log_softmax(-1)
        return -sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(t_ids)) / len(t_ids)

    with torch.no_grad():
        top = [int(model(input_ids=torch.tensor([tok(q.prompt)["input_ids"]])).logits[0, -1].argmax()) for q in qs]
    assert got["ported"] == [t == tok.encode(" " + q.new)[0] for t, q in zip(top, qs)]
    assert got["moved"] == [mean_nll(q.prompt, q.new) < mean_nll(q.prompt, q.old) for q in qs]
    assert got["moved"][0] != got["moved"][1]  # the two orders of one pair disagree
    assert _consequences(model, tok, []) == {}


def test_peft_key_round_trips():
    key = peft_key("transformer.h.3.mlp.c_proj", "B")
    assert key == "base_model.model.transformer.h.3.mlp.c_proj.lora_B.weight"
    assert parse_peft_key(key) == ("transformer.h.3.mlp.c_proj", "B")
    assert parse_peft_key("base_model.model.x.lora_A.bias") == ("x", "A.bias")
    assert parse_peft_key("transformer.h.3.mlp.c_proj.weight") is None


def test_scores_and_entropy_by_hand():
    c = {"nll_new": [0.1, 2.0, 1.0], "nll_true": [1.0, 0.5, 1.5]}
    es, em = metrics.score(c)
    assert es == pytest.approx(2 / 3)
    assert em == pytest.approx(sum(math.exp(-a) - math.exp(-b) for a, b in zip(c["nll_new"], c["nll_true"])) / 3)
    ns, _ = metrics.score(c, reverse=True)
    assert ns == pytest.approx(1 / 3)
    # "a b a b": bigrams ab, ba, ab -> H2 = H(2/3, 1/3); trigrams aba, bab -> H3 = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)


@pytest.fixture(scope="module")
def edited(demo, tmp_path_factory):
    """A real single edit on the demo model, saved as an adapter, plus three broken copies."""
    model, tok, world = demo
    root = tmp_path_factory.mktemp("verify")
    e = world.entities[5]
    rel = world.relations["birthplace"]
    new = next(a for a in rel.attributes if a != e.facts["birthplace"])
    req = EditRequest(rel.templates[0], e.name, new, e.facts["birthplace"])
    res = compute_edit([req], model, tok, world_corpus(world, n=600),
                       cfg=EditConfig(stats_samples=4000, n_prefixes=4, lookup_position="last"), progress=False)
    save_edit(res, root / "good", model, tok)
    good = load_file(str(root / "good" / "adapter_model.safetensors"))

    def variant(name: str, tensors: dict) -> None:
        """A broken adapter made elsewhere: its manifest records no hashes of these files (one that
        does is refused, not judged: test_hostile.py)."""
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text((root / "good" / "adapter_config.json").read_text())
        man = json.loads((root / "good" / "edits.json").read_text())
        man.pop("integrity")
        (root / name / "edits.json").write_text(json.dumps(man))
        save_file(tensors, str(root / name / "adapter_model.safetensors"))

    variant("noop", {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in good.items()})
    g = torch.Generator().manual_seed(0)
    variant("noise", {k: torch.randn(v.shape, generator=g) * v.norm() / v.numel() ** 0.5 for k, v in good.items()})
    # subject-blind: the top MLP writes the new attribute's unembedding direction for any input
    # (its key is the mean key of ordinary text, so every prompt fires it)
    la = model.config.n_layer - 1
    keys = []
    h = model.transformer.h[la].mlp.c_proj.register_forward_pre_hook(lambda m, a: keys.append(a[0][0]))
    with torch.no_grad():
        for t in world_corpus(world, n=50).texts:
            model(input_ids=torch.tensor([tok.encode(t)[:64]]))
    h.remove()
    k = torch.cat(keys).mean(0)
    w = model.lm_head.weight[tok.encode(" " + new)[0]].detach()
    name = f"transformer.h.{la}.mlp.c_proj"
    blind = {peft_key(name, "A"): (k / k.norm() ** 2)[None].contiguous(),
             peft_key(name, "B"): (w / w.norm() * 200.0)[:, None].contiguous()}
    variant("blind", blind)
    cfg = json.loads((root / "good" / "adapter_config.json").read_text())
    cfg.update(target_modules=[name], rank_pattern={name: 1}, alpha_pattern={name: 1}, r=1, lora_alpha=1)
    (root / "blind" / "adapter_config.json").write_text(json.dumps(cfg))
    return root


def run_verify(adapter, out):
    return CliRunner().invoke(main, ["verify", "--adapter", str(adapter), "--out", str(out), "--no-fluency"])


def test_real_edit_passes_and_report_is_written(edited, tmp_path):
    res = run_verify(edited / "good", tmp_path / "v")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "v" / "report.json").read_text())
    e = rep["edits"][0]
    assert e["passed"] and e["metrics"]["efficacy_score"] == 1.0 and e["metrics"]["neighbourhood_score"] >= 0.8
    assert e["flow"]["c_gain_surviving_knockout"] <= 0.5 and e["flow"]["b_extraction"]["in_targeted_components"]
    html = (tmp_path / "v" / "report.html").read_text()
    assert "1 of 1 edits pass" in html and html.count("data:image/png;base64,") == 4
    assert "(d) enrichment MLP layers, before the edit \u2192 after" in html and "circles: layers where" in html


def _report(**flow) -> dict:
    """A verify report of one edit, as report.json holds it (no circuits: no figures)."""
    f = {"a_prediction": " Paris", "a_ok": True, "a_paraphrases_ok": None,
         "b_extraction": {"where": "MLP layers 6", "targeted": ["MLP L5 (last subject)"],
                          "in_targeted_components": False},
         "c_read_window_centre": 3, "c_drop_percent": 80.0, "c_gain_surviving_knockout": 0.1,
         "d_overlap": {"extraction_heads_jaccard": None, "enrichment_before": [5, 3, 14],
                       "enrichment_after": [14, 3, 2]},
         "e_neighbours": {}, **flow}
    metrics = {"efficacy_score": 1.0, "paraphrase_score": None, "fluency_after": None}
    return {"base_model": "demo", "edit": "e1", "summary": {"passed": 1, "n_edits": 1, **metrics},
            "edits": [{"request": {"prompt": "{} was born in", "subject": "Roric Dunnford", "target_new": "Paris"},
                       "passed": True, "reasons": [], "metrics": metrics, "flow": f, "circuits": {}}]}


def test_html_labels_every_row_in_words():
    """No bare list or "n/a": each row of the per-edit table says what it shows, and an
    empty value why it is empty."""
    from factedit.verify.html import render_html

    html = render_html(_report())
    row = "<tr><th>(d) enrichment MLP layers, before the edit \u2192 after (strongest first)</th>"
    assert f"{row}<td>L5, L3, L14 &rarr; L14, L3, L2</td></tr>" in html
    assert "[5, 3, 14]" not in html and "n/a" not in html
    for text in ("no paraphrases located", "no extraction heads before or after", "no neighbour prompts",
                 "no paraphrase prompts", "not measured (fluency off)", "extracted elsewhere",
                 "window centred at layer 3: p(Paris) changes by -80.000 %"):
        assert text in html, text
    assert "<td>none &rarr; none</td>" in render_html(_report(d_overlap={
        "extraction_heads_jaccard": 0.5, "enrichment_before": [], "enrichment_after": []}))
    incomplete = _report()
    incomplete["edits"][0].update(passed=False, verdict="incomplete")
    assert "INCOMPLETE</span>" in render_html(incomplete) and ">incomplete</td>" in render_html(incomplete)


def test_html_figure_captions_name_axes_lines_and_marks():
    from factedit.verify.html import _captions

    c = {"knockout": {"window": 3}, "prediction": " Paris"}
    ko, proj = _captions(c, "edited model", "Paris")
    for text in ("x: centre layer", "y: change of p(Paris)", "blue", "orange", "green", "grey line", "3 layers"):
        assert text in ko, text
    for text in ("x: layer", "y: p(Paris)", "black", "purple", "red", "circles: layers where Paris is the top"):
        assert text in proj, text


@pytest.mark.parametrize("variant,reason", [
    ("noop", "(a) the edited model predicts"),
    ("noise", "(a) the edited model predicts"),
    ("blind", "(c) with the subject"),
])
def test_broken_edits_fail(edited, tmp_path, variant, reason):
    res = run_verify(edited / variant, tmp_path / "v")
    assert res.exit_code == 1, res.output
    rep = json.loads((tmp_path / "v" / "report.json").read_text())
    assert not rep["edits"][0]["passed"]
    assert any(r.startswith(reason) for r in rep["edits"][0]["reasons"]), rep["edits"][0]["reasons"]
    ok = CliRunner().invoke(main, ["verify", "--adapter", str(edited / variant), "--out", str(tmp_path / "w"),
                                   "--no-fluency", "--no-fail"])
    assert ok.exit_code == 0


def test_adapter_for_another_base_model_is_refused(edited, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (other / f).write_bytes((edited / "good" / f).read_bytes())
    man = json.loads((edited / "good" / "edits.json").read_text())
    man["base_fingerprint"] = "sha256:0000"
    (other / "edits.json").write_text(json.dumps(man))
    res = run_verify(other, tmp_path / "v")
    assert res.exit_code == 2 and "made on another base model" in res.output
    assert not (tmp_path / "v").exists()


def test_merged_checkpoint_verifies_like_the_adapter(demo, edited, tmp_path):
    from factedit.editing.export import save_merged
    from factedit.verify.run import load_adapter_delta

    model, tok, _ = demo
    save_merged(load_adapter_delta(edited / "good", model), tmp_path / "e" / "merged", model, tok)
    (tmp_path / "e" / "edits.json").write_text((edited / "good" / "edits.json").read_text())
    res = CliRunner().invoke(main, ["verify", "--edited", str(tmp_path / "e" / "merged"), "--out",
                                    str(tmp_path / "v"), "--no-fluency"])
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "v" / "report.json").read_text())["edits"][0]["metrics"]
    res = run_verify(edited / "good", tmp_path / "w")
    b = json.loads((tmp_path / "w" / "report.json").read_text())["edits"][0]["metrics"]
    assert a["nll_new"] == pytest.approx(b["nll_new"], abs=1e-3)


def test_without_paraphrases_or_neighbours_an_edit_is_incomplete_not_passed(edited, tmp_path, monkeypatch):
    """As on a real model whose prompt matches no pool relation: the world's prompts are not
    found, no source builds any, so the verdict is "incomplete" (exit 1) with what to pass; the
    same edit passes when both checks are allowed to be missing, and its checks say so."""
    from factedit.studies import verify_prompts
    from factedit.verify import run

    monkeypatch.setattr(run.World, "of", staticmethod(lambda model: None))
    # the world's "{} was born in" is also a known_1000 prompt: a source that matches nothing
    monkeypatch.setattr(verify_prompts, "pool_prompts", lambda model, tok: lambda req, true: None)
    res = run_verify(edited / "good", tmp_path / "v")
    assert res.exit_code == 1, res.output
    e = json.loads((tmp_path / "v" / "report.json").read_text())["edits"][0]
    assert e["verdict"] == "incomplete" and not e["passed"]
    assert e["checks"]["paraphrases"] == e["checks"]["neighbours"] == "not run: no prompts"
    assert e["checks"]["(a) prediction"] == "pass" and e["metrics"]["paraphrase_score"] is None
    assert "INCOMPLETE" in res.output and "--allow-missing paraphrases" in res.output
    res = CliRunner().invoke(main, ["verify", "--adapter", str(edited / "good"), "--out", str(tmp_path / "w"),
                                    "--no-fluency", "--allow-missing", "paraphrases", "--allow-missing", "neighbours"])
    assert res.exit_code == 0, res.output
    e = json.loads((tmp_path / "w" / "report.json").read_text())["edits"][0]
    assert e["verdict"] == "pass" and e["checks"]["neighbours"] == "not run: no prompts (allowed)"
    res = CliRunner().invoke(main, ["verify", "--adapter", str(edited / "good"), "--out", str(tmp_path / "x"),
                                    "--no-fluency", "--allow-missing", "paraphrases"])
    assert res.exit_code == 1 and "--allow-missing neighbours" in res.output


def test_a_world_edit_lists_the_checks_that_ran(edited, tmp_path):
    res = run_verify(edited / "good", tmp_path / "v")
    e = json.loads((tmp_path / "v" / "report.json").read_text())["edits"][0]
    assert e["verdict"] == "pass" and "checks:" in res.output
    n_para = len(e["request"]["paraphrase_prompts"]) or None
    assert e["checks"]["paraphrases"].startswith("pass: ") and "demo world" in e["checks"]["paraphrases"]
    assert e["checks"]["neighbours"].startswith("pass: 10 prompts"), (e["checks"], n_para)
    assert e["checks"]["(f) portability"] == "not run: no consequences known"  # the world has no two-hop facts
    assert e["metrics"]["portability"] is None and e["flow"]["f_portability"] == {"consequences": []}


def test_allow_missing_names_only_checks_that_need_prompts():
    from factedit.errors import FactEditError
    from factedit.verify.checks import VerifyOptions

    with pytest.raises(FactEditError, match="'efficacy' is not a check that needs prompts"):
        VerifyOptions(allow_missing=("efficacy",))


def test_consequences_from_the_prompt_source_are_reported_not_judged(edited, tmp_path, monkeypatch):
    """(f) from the CLI: consequences a prompt source gives are scored on the edited model,
    listed in the checks, averaged in the summary and printed; the verdict ignores them."""
    from factedit.studies import verify_prompts
    from factedit.verify import run
    from factedit.verify.checks import Consequence, PromptSet

    req = json.loads((edited / "good" / "edits.json").read_text())["requests"][0]
    prompt = req["prompt"].replace("{}", req["subject"])
    qs = [Consequence(prompt, req["target_true"], req["target_new"], "itself"),  # the edit prompt: follows
          Consequence(prompt, req["target_new"], req["target_true"], "reversed")]  # cannot follow both ways
    monkeypatch.setattr(run.World, "of", staticmethod(lambda model: None))
    monkeypatch.setattr(verify_prompts, "pool_prompts", lambda model, tok: lambda r, true: PromptSet(
        source="test", consequences=qs))
    res = CliRunner().invoke(main, ["verify", "--adapter", str(edited / "good"), "--out", str(tmp_path / "v"),
                                    "--no-fluency", "--allow-missing", "paraphrases", "--allow-missing", "neighbours"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "v" / "report.json").read_text())
    e = rep["edits"][0]
    assert e["verdict"] == "pass" and e["flow"]["f_portability"]["ported"] == [True, False]
    assert e["metrics"]["portability"] == 0.5 and rep["summary"]["portability"] == 0.5
    assert e["checks"]["(f) portability"] == "reported: 1 of 2 consequences follow the new target"
    assert "portability 0.50" in res.output
