"""A micro-world trains in seconds, its loss falls, and the saved folder loads without factedit."""

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from factedit.world.recipe import ModelSpec, TrainSpec, WorldRecipe, WorldSpec
from factedit.world.train import train_world


def micro_recipe(steps=80):
    return WorldRecipe(
        world=WorldSpec(seed=0, n_entities=12, n_first=6, n_last=6, paraphrase_test_fraction=0.25),
        model=ModelSpec(vocab_size=400, n_layer=2, n_embd=32, n_head=2, n_positions=128),
        train=TrainSpec(steps=steps, query_batch=16, bio_batch=4, index_batch=4, lr=1e-2,
                        warmup_steps=5, eval_every=1000, eval_entities=12, threads=1),
    )


@pytest.mark.slow
def test_micro_world_loss_falls_and_saves(tmp_path):
    res = train_world(micro_recipe(), tmp_path / "m", progress=False, log=lambda m: None)
    losses = res["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "gpt2"
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "world.json").is_file()
    assert len(tok.encode("Q: Where was")) > 0


def test_training_is_deterministic(tmp_path):
    a = train_world(micro_recipe(8), tmp_path / "a", progress=False, log=lambda m: None)
    b = train_world(micro_recipe(8), tmp_path / "b", progress=False, log=lambda m: None)
    assert a["losses"] == b["losses"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
