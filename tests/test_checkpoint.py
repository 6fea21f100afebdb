"""The shipped demo checkpoint: plain transformers loads it and it recalls the world's facts
as its world.json records."""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from factedit.paths import demo_checkpoint
from factedit.world.evaluate import top1_tokens
from factedit.world.generate import World

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-world"
FLOORS = {"train_templates": 0.99, "heldout_templates": 0.95}  # issue 2


def test_demo_checkpoint_is_found_and_small():
    assert demo_checkpoint() == CKPT
    files = list(CKPT.iterdir())
    assert sum(f.stat().st_size for f in files) < 40 * 2**20
    assert (CKPT / "model.safetensors").is_file()
    assert not any(f.suffix in {".bin", ".pt", ".pth"} for f in files)


def _sample_recall(n_entities=150, seed=1234) -> dict[str, float]:
    """Recall measured with plain transformers (no factedit model code) on a sample."""
    tok = AutoTokenizer.from_pretrained(CKPT)
    model = AutoModelForCausalLM.from_pretrained(CKPT).eval()
    world = World.load(CKPT)
    ents = random.Random(seed).sample(world.entities, n_entities)
    out = {}
    for split, heldout in (("train_templates", False), ("heldout_templates", True)):
        pool = [e for e in ents if e.paraphrase_test] if heldout else ents
        prompts, targets = [], []
        for e in pool:
            for _rid, prompt, attr in world.prompts(e, heldout=heldout):
                prompts.append(prompt)
                targets.append(tok.encode(" " + attr)[0])
        with torch.no_grad():
            preds = top1_tokens(model, tok, prompts)
        out[split] = sum(p == t for p, t in zip(preds, targets)) / len(prompts)
    return out


@pytest.fixture(scope="module")
def sample_recall():
    return _sample_recall()


@pytest.mark.slow
def test_recall_matches_what_the_checkpoint_records(sample_recall):
    recorded = World.load(CKPT).meta["recall"]
    for split, acc in sample_recall.items():
        # a 150-entity sample against the full-world figure: allow sampling noise
        assert abs(acc - recorded[f"recall_{split}"]) < 0.08, (split, acc, recorded)


@pytest.mark.slow
def test_recall_floors(sample_recall):
    for split, floor in FLOORS.items():
        assert sample_recall[split] >= floor, (split, sample_recall[split])
