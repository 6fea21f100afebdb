"""Resumable value fits (factedit/editing/fit_cache.py): a cached chunk is read back bit for
bit, a stopped fit resumes at the first chunk not yet fitted and ends where an unbroken fit
ends, and anything the fit depends on changes the key."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import factedit.editing.values as values
from factedit.editing.config import EditConfig
from factedit.editing.edit import compute_edit
from factedit.editing.fit_cache import FitCache
from factedit.editing.requests import EditRequest
from factedit.editing.stats import world_corpus
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint
from factedit.studies.world_edits import sample_world_edits

from .families import tiny_model
from .test_locate import word_tokenizer

REQS = [EditRequest("the capital of {} is", "beats music", "apple"),
        EditRequest("{} is owned by", "france", "paris"),
        EditRequest("the capital of {} is", "apple", "music"),
        EditRequest("{} is owned by", "paris", "france"),
        EditRequest("who plays {} is", "music", "the")]
PREFIXES = ["", "the capital . ", "music is owned . "]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTEDIT_CACHE", str(tmp_path / "cache"))


def _setup(family: str = "llama"):
    tok = word_tokenizer()
    tok.pad_token = "[UNK]"
    adapter = ModelLayout(tiny_model(family))
    cfg = EditConfig(steps=4, n_prefixes=2, kl_prompt="{} is")
    sites = values.ValueSites(1, [], "subject")
    return tok, adapter, cfg, sites


def _same(a, b) -> None:
    assert torch.equal(a.mlp, b.mlp)
    assert a.nll == b.nll and a.base_nll == b.base_nll


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_stopped_fit_resumes_and_ends_as_an_unbroken_fit(family, tmp_path):
    tok, adapter, cfg, sites = _setup(family)
    unbroken = values.fit_values(adapter, tok, REQS, PREFIXES, sites, cfg, chunk=2)
    cache = FitCache(tmp_path / "fits", model_fingerprint(adapter.model))
    # "stopped" after the first chunk: only its file is there
    values.fit_values(adapter, tok, REQS[:2], PREFIXES, sites, cfg, chunk=2, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1) and len(list(cache.root.glob("*.safetensors"))) == 1
    resumed = values.fit_values(adapter, tok, REQS, PREFIXES, sites, cfg, chunk=2, cache=cache)
    assert (cache.hits, cache.misses) == (1, 3)  # chunk 0 read back, chunks 1-2 fitted and saved
    _same(resumed, unbroken)
    again = values.fit_values(adapter, tok, REQS, PREFIXES, sites, cfg, chunk=2, cache=cache)
    assert (cache.hits, cache.misses) == (4, 3)
    _same(again, unbroken)
    assert not list(cache.root.glob(".*tmp"))  # nothing half-written left behind


def test_whatever_the_fit_depends_on_changes_the_key(tmp_path):
    tok, adapter, cfg, sites = _setup()
    p = next(adapter.model.parameters())
    cache = FitCache(tmp_path, model_fingerprint(adapter.model))
    key = cache.key(REQS[:2], PREFIXES, sites, cfg, p.dtype, p.device)
    assert key == cache.key(list(REQS[:2]), list(PREFIXES), sites, dataclasses.replace(cfg), p.dtype, p.device)
    others = [
        cache.key(REQS[:2], PREFIXES, sites, dataclasses.replace(cfg, lr=0.25), p.dtype, p.device),
        cache.key(REQS[:2], PREFIXES, sites, dataclasses.replace(cfg, kl_weight=0.5), p.dtype, p.device),
        cache.key(REQS[:2], PREFIXES, values.ValueSites(2, [], "subject"), cfg, p.dtype, p.device),
        cache.key(REQS[:2], PREFIXES, values.ValueSites(1, [], "last"), cfg, p.dtype, p.device),
        cache.key(REQS[:2], PREFIXES, values.ValueSites(1, [(1, 0)], "subject"), cfg, p.dtype, p.device),
        cache.key(REQS[1::-1], PREFIXES, sites, cfg, p.dtype, p.device),  # order: the chunk stops as one
        cache.key(REQS[:2], PREFIXES[:2], sites, cfg, p.dtype, p.device),
        cache.key(REQS[:2], PREFIXES, sites, cfg, torch.float16, p.device),
        FitCache(tmp_path, "sha256:another-model").key(REQS[:2], PREFIXES, sites, cfg, p.dtype, p.device),
    ]
    assert len({key, *others}) == len(others) + 1


def test_an_unreadable_entry_is_fitted_again_with_a_message(tmp_path):
    """A cache entry is never trusted beyond its hash: a truncated one is fitted again (and
    replaced), with a message; then it is read back. (Changed values: test_hostile.py.)"""
    tok, adapter, cfg, sites = _setup()
    said: list[str] = []
    cache = FitCache(tmp_path, model_fingerprint(adapter.model), log=said.append)
    first = values.fit_values(adapter, tok, REQS[:1], PREFIXES, sites, cfg, cache=cache)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:20])
    again = values.fit_values(adapter, tok, REQS[:1], PREFIXES, sites, cfg, cache=cache)
    assert cache.rebuilt == 1 and len(said) == 1
    assert "cannot be read" in said[0] and "fitting that chunk again" in said[0]
    _same(again, first)
    values.fit_values(adapter, tok, REQS[:1], PREFIXES, sites, cfg, cache=cache)
    assert cache.hits == 1 and cache.rebuilt == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(FactEditError, match="not a directory"):
        FitCache(tmp_path / "file", "fp")


def test_a_batch_edit_with_a_fit_cache_refits_nothing_the_second_time(demo, tmp_path, monkeypatch):
    """The API's batch (MEMIT-style spread) on the demo model: the second run reads the fit
    back (no chunk is fitted again) and writes the same update; a λ change reuses the fit."""
    model, tok, world = demo
    corpus = world_corpus(world, n=400)
    reqs = [w.request for w in sample_world_edits(world, 3, seed=0)]
    cfg = EditConfig(method="mlp", steps=5, n_prefixes=2, stats_samples=200)
    first = compute_edit(reqs, model, tok, corpus, cfg=cfg, mode="batch", progress=False, fit_cache=tmp_path)
    calls = []
    real = values._fit_chunk
    monkeypatch.setattr(values, "_fit_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = compute_edit(reqs, model, tok, corpus, cfg=cfg, mode="batch", progress=False, fit_cache=tmp_path)
    assert calls == []
    for name in first.delta.modules():
        assert torch.equal(first.delta.dense(name), second.delta.dense(name))
    third = compute_edit(reqs, model, tok, corpus, cfg=dataclasses.replace(cfg, batch_lambda=cfg.batch_lambda / 10),
                         mode="batch", progress=False, fit_cache=tmp_path)
    assert calls == [] and third.fit.nll == first.fit.nll
    assert not torch.equal(third.delta.dense(name), first.delta.dense(name))
