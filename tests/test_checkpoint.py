"""The shipped demo checkpoint: plain transformers loads it and it recalls the world's facts."""

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from factedit.paths import demo_checkpoint
from factedit.world.evaluate import top1_tokens
from factedit.world.generate import World

CKPT = Path(__file__).resolve().parents[1] / "checkpoints" / "demo-world"


def test_demo_checkpoint_is_found_and_small():
    assert demo_checkpoint() == CKPT
    files = list(CKPT.iterdir())
    assert sum(f.stat().st_size for f in files) < 40 * 2**20
    assert (CKPT / "model.safetensors").is_file()
    assert not any(f.suffix in {".bin", ".pt", ".pth"} for f in files)


def test_plain_transformers_loads_it_and_it_meets_the_recall_floor():
    tok = AutoTokenizer.from_pretrained(CKPT)
    model = AutoModelForCausalLM.from_pretrained(CKPT).eval()
    world = World.load(CKPT)
    rng = random.Random(1234)
    ents = rng.sample(world.entities, 150)
    for heldout, floor in ((False, 0.99), (True, 0.95)):
        pool = [e for e in ents if e.paraphrase_test] if heldout else ents
        prompts, targets = [], []
        for e in pool:
            for _rid, prompt, attr in world.prompts(e, heldout=heldout):
                prompts.append(prompt)
                targets.append(tok.encode(" " + attr)[0])
        with torch.no_grad():
            preds = top1_tokens(model, tok, prompts)
        acc = sum(p == t for p, t in zip(preds, targets)) / len(prompts)
        assert acc >= floor, (heldout, acc)
