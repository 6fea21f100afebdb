"""The demo-world recipe: world size, tokenizer, model shape and training schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from factedit.recipes import RecipeError, from_dict, load_yaml


@dataclass
class WorldSpec:
    seed: int = 0
    n_entities: int = 1200
    n_first: int = 110
    n_last: int = 140
    paraphrase_test_fraction: float = 0.2

    def validate(self) -> None:
        if self.n_entities < 1:
            raise RecipeError("world.n_entities must be at least 1")
        if not 0.0 <= self.paraphrase_test_fraction <= 1.0:
            raise RecipeError("world.paraphrase_test_fraction must lie in [0, 1]")


@dataclass
class ModelSpec:
    vocab_size: int = 1200  # BPE vocabulary trained on the world's text
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 8
    n_inner: int | None = None  # MLP width (default 4 * n_embd)
    n_positions: int = 128

    def validate(self) -> None:
        if self.n_embd % self.n_head:
            raise RecipeError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")


@dataclass
class TrainSpec:
    seed: int = 0
    steps: int = 6000
    query_batch: int = 96
    bio_batch: int = 16
    index_batch: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    prefix_prob: float = 0.3
    threads: int = 2
    curriculum_steps: int = 0  # grow the entity pool over this many steps (0: all from the start)
    curriculum_start: float = 0.1  # the pool's initial fraction of the entities
    bf16: bool = False  # CPU autocast; faster where the CPU has bf16 instructions
    eval_every: int = 1000
    eval_entities: int = 300

    def validate(self) -> None:
        if self.steps < 1 or self.query_batch < 0 or self.bio_batch < 0 or self.index_batch < 0:
            raise RecipeError("train.steps must be >= 1 and the batch sizes >= 0")


@dataclass
class WorldRecipe:
    world: WorldSpec = field(default_factory=WorldSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    analysis: dict = field(default_factory=dict)  # read by the analysis stage (LocateConfig)
    edit: dict = field(default_factory=dict)  # read by the editing stage (EditConfig)

    @classmethod
    def load(cls, path: str | Path) -> WorldRecipe:
        return from_dict(cls, load_yaml(path), where=str(path))
