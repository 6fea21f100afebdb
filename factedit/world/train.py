"""Train the demo-world model: a small GPT-2 on the world's facts.

Deterministic from the recipe's seeds (single process, fixed thread count). The output
directory loads with plain ``AutoTokenizer``/``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from factedit.io import commit_dir, dumps_json, staging_dir
from factedit.world.corpus import bio_text, index_text, query_example
from factedit.world.evaluate import evaluate_recall
from factedit.world.generate import World, generate_world
from factedit.world.recipe import WorldRecipe
from factedit.world.tokenizer import train_tokenizer


def _pad(seqs: list[list[int]], masks: list[list[float]], pad_id: int):
    """Right-pad to a (B, T) batch, T a multiple of 8 (fewer distinct shapes, faster kernels);
    causal attention never lets a real token see the padding."""
    t = -(-max(len(s) for s in seqs) // 8) * 8
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    w = torch.zeros(len(seqs), t)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        w[i, : len(m)] = torch.tensor(m)
    return ids, w


def _example_loss(model, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the mean NLL over each example's weighted target tokens."""
    logits = model(input_ids=ids).logits[:, :-1]  # (B, T-1, V)
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.size(0), -1)
    tw = w[:, 1:]
    return ((nll * tw).sum(1) / tw.sum(1).clamp_min(1)).mean()


class Batcher:
    """Draws the three kinds of training example (see ``corpus``) from a seeded RNG."""

    def __init__(self, world: World, tok: PreTrainedTokenizerFast, recipe: WorldRecipe):
        self.world, self.tok, self.spec = world, tok, recipe.train
        self.rng = random.Random(recipe.train.seed)
        self.max_len = recipe.model.n_positions
        self.eos = tok.eos_token_id
        self.step = 0

    def entity(self):
        """An entity from the curriculum's pool: it starts with a fraction of the entities and
        grows linearly to all of them (a short knowledge-acquisition plateau needs few
        individuals at first; the pool is a fixed prefix of the shuffled entity list)."""
        spec, n = self.spec, len(self.world.entities)
        if spec.curriculum_steps > 0 and self.step < spec.curriculum_steps:
            frac = spec.curriculum_start + (1 - spec.curriculum_start) * self.step / spec.curriculum_steps
            n = max(1, round(frac * n))
        return self.world.entities[self.rng.randrange(n)]

    def queries(self, n: int) -> list:
        """Query examples, returned as two padded batches (short and long) to save padding."""
        rows = []
        for _ in range(n):
            e = self.entity()
            prompt, target = query_example(self.world, e, self.rng, self.spec.prefix_prob)
            p, t = self.tok.encode(prompt), self.tok.encode(target)
            rows.append((p + t, [0.0] * len(p) + [1.0] * len(t)))
        rows.sort(key=lambda r: len(r[0]))
        halves = [rows[: n // 2], rows[n // 2 :]]
        return [_pad([r[0] for r in h], [r[1] for r in h], self.eos) for h in halves if h]

    def texts(self, n: int, kind: str):
        seqs, masks = [], []
        for _ in range(n):
            e = self.entity()
            text = bio_text(self.world, e, self.rng) if kind == "bio" else index_text(self.world, e, self.rng)
            ids = (self.tok.encode(text) + [self.eos])[: self.max_len]
            seqs.append(ids)
            mask = [1.0] * len(ids)
            if kind == "index":  # the name opens the line and cannot be predicted: no loss on it
                n_name = len(self.tok.encode(e.name))
                mask[:n_name] = [0.0] * n_name
            masks.append(mask)
        return _pad(seqs, masks, self.eos)


def build_model(recipe: WorldRecipe, tok: PreTrainedTokenizerFast) -> GPT2LMHeadModel:
    m = recipe.model
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=m.n_positions, n_embd=m.n_embd, n_layer=m.n_layer,
        n_head=m.n_head, n_inner=m.n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(recipe.train.seed)
    return GPT2LMHeadModel(cfg)


def _lr_at(step: int, spec) -> float:
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    frac = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def train_world(recipe: WorldRecipe, out: str | Path, progress: bool = True,
                log=print, save_every: bool = False) -> dict:
    """Generate the world, train tokenizer and model, evaluate, save to ``out`` atomically.

    Returns ``{"recall": {...}, "losses": [summed loss per step], "train_seconds": ...}``.
    """
    out = Path(out)
    torch.set_num_threads(recipe.train.threads)
    torch.manual_seed(recipe.train.seed)
    ws = recipe.world
    world = generate_world(ws.seed, ws.n_entities, ws.n_first, ws.n_last, ws.paraphrase_test_fraction)
    tok = train_tokenizer(world, recipe.model.vocab_size, ws.seed)
    model = build_model(recipe, tok)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"world: {len(world.entities)} entities x {len(world.relations)} relations; "
        f"tokenizer: {len(tok)} tokens; model: {n_params / 1e6:.2f}M parameters")

    spec = recipe.train
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": spec.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.98))
    batcher = Batcher(world, tok, recipe)
    history = []
    losses_per_step: list[float] = []
    t0 = time.time()
    bar = tqdm(range(spec.steps), disable=not progress, desc="training", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        batcher.step = step
        model.train()
        losses = {}
        opt.zero_grad(set_to_none=True)
        for kind, n in (("query", spec.query_batch), ("bio", spec.bio_batch), ("index", spec.index_batch)):
            if n == 0:
                continue
            batches = batcher.queries(n) if kind == "query" else [batcher.texts(n, kind)]
            for ids, w in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
                    loss = _example_loss(model, ids, w) * (len(ids) / n)
                loss.backward()
                losses[kind] = losses.get(kind, 0.0) + loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        losses_per_step.append(sum(losses.values()))
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.steps:
            model.eval()
            rec = evaluate_recall(model, tok, world, max_entities=spec.eval_entities)
            history.append({"step": step + 1, "elapsed_s": round(time.time() - t0, 1), **losses, **rec})
            log(f"step {step + 1}: {dumps_json(history[-1])}")
            if save_every and step + 1 < spec.steps:
                world.meta = {"recipe": asdict(recipe), "partial_step": step + 1, "history": history}
                _save(out, model, tok, world)
    train_seconds = time.time() - t0

    model.eval()
    final = evaluate_recall(model, tok, world)
    world.meta = {"recipe": asdict(recipe), "train_seconds": round(train_seconds, 1),
                  "n_params": n_params, "recall": final, "history": history}
    _save(out, model, tok, world)
    log(f"final recall: {dumps_json(final)}; trained in {train_seconds / 60:.1f} min; saved to {out}")
    return {"recall": final, "losses": losses_per_step, "train_seconds": train_seconds}


def _save(out: Path, model, tok, world: World) -> None:
    """Build the folder in a hidden sibling, then put it in place in one step; other files
    already in ``out`` are kept (see :func:`factedit.io.commit_dir`)."""
    tmp = staging_dir(out)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        world.save(tmp / "world.json")
        commit_dir(tmp, out, overwrite=True)  # the CLI has refused a non-empty `out` without --overwrite
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
