"""`factedit.edit`: the Python face of `factedit edit` (same options, same files)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from factedit.analysis.circuit import RecallCircuit
from factedit.editing.config import EditConfig
from factedit.editing.corpora import resolve_corpus
from factedit.editing.edit import EditResult, compute_edit
from factedit.editing.requests import EditRequest, check_conflicts, load_requests
from factedit.errors import EditFailedError, FactEditError, shown
from factedit.models.fingerprint import model_fingerprint
from factedit.world.generate import World


def base_model_dir(model) -> Path | None:
    """The local folder of a model given as None (the demo model), a path, or a loaded model."""
    from factedit.models.zoo import model_dir

    if model is None or isinstance(model, (str, Path)):
        return model_dir(model)
    name = str(getattr(model, "name_or_path", "") or "")
    return model_dir(name) if name else None


def edit_config_for_model(model) -> EditConfig:
    """The ``edit:`` section of the recipe that comes with the model (a world model's, or a named
    real model's shipped recipe), else the defaults (ROME's settings)."""
    from factedit.recipes import from_dict, model_recipe_section

    section, where = model_recipe_section(model, "edit")
    return from_dict(EditConfig, section, where=where)


def edit(requests: EditRequest | list[EditRequest] | str | Path, *, model=None, tokenizer=None,
         config: EditConfig | None = None, mode: str | None = None,
         circuits: list[RecallCircuit | None] | None = None, stats_corpus: list[str | Path] | None = None,
         out: str | Path | None = None, merge: bool = False, overwrite: bool = False,
         progress: bool = True, log: Callable[[str], None] = lambda m: None, append: bool = False,
         fit_cache: str | Path | None = None) -> EditResult:
    """Edit facts. ``requests``: one request, a list, or a request file (CounterFact or flat
    JSON/JSONL). ``model``: a loaded model (with ``tokenizer``), a path, or None for the demo
    model. With ``out`` the adapter (and ``merged/`` with ``merge``) is written there. With
    ``append``, ``out`` holds a sequence (an earlier sequential edit): the requests continue it,
    on the model with its edits applied, and the folder is updated in one atomic step, under the
    folder's lock (another factedit process continuing or undoing it is refused). With
    ``fit_cache`` (a directory) the value fits are kept there chunk by chunk: a long batch
    that stops resumes its fit where it stopped. Every argument is checked before any work; a
    bad one raises :class:`~factedit.errors.FactEditError` with the command line's message."""
    from factedit.paths import check_output_dir

    requests = check_edit_args(requests, model, tokenizer, config, mode, circuits, stats_corpus, out, fit_cache)
    check_conflicts(requests)
    if append:
        if out is None:
            raise FactEditError("append: give the folder of the sequence to continue (--out)")
        if mode not in (None, "sequential"):
            raise FactEditError(f"append continues a sequence: its mode is 'sequential', not {mode!r}")
        mode = "sequential"
    if out is not None:
        check_output_dir(out, overwrite or append, base_model_dir(model))
    if fit_cache is not None:
        from factedit.editing.fit_cache import check_fit_cache

        check_fit_cache(fit_cache, base_model_dir(model))
    if append:  # the sequence is read, continued and written under its folder's lock
        from factedit.editing.history import load_sequence
        from factedit.io import held_lock

        load_sequence(out, what="--append: --out")  # refused before its lock is taken (no lock file left)
        with held_lock(out, "--out"):
            return _edit(requests, model, tokenizer, config, mode, circuits, stats_corpus, out, merge, overwrite,
                         progress, log, append, fit_cache)
    return _edit(requests, model, tokenizer, config, mode, circuits, stats_corpus, out, merge, overwrite, progress,
                 log, append, fit_cache)


def check_edit_args(requests, model, tokenizer, config, mode, circuits, stats_corpus, out,
                    fit_cache) -> list[EditRequest]:
    """The arguments of :func:`edit`, checked before any work (the same checks as the CLI's)."""
    from factedit.validate import check_instance, check_model_args, check_path_arg, check_path_list

    if isinstance(requests, (str, Path)):
        requests = load_requests(requests)
    elif isinstance(requests, EditRequest):
        requests = [requests]
    if not isinstance(requests, (list, tuple)) or not all(isinstance(r, EditRequest) for r in requests):
        bad = requests if not isinstance(requests, (list, tuple)) else next(
            r for r in requests if not isinstance(r, EditRequest))
        raise FactEditError(f"edit: requests must be an EditRequest, a list of them or a request file, got "
                            f"{type(bad).__name__} {shown(bad)}")
    if not requests:
        raise FactEditError("edit: no edit requests given")
    check_model_args(model, tokenizer, "edit")
    check_instance(config, EditConfig, "edit: config", "an EditConfig")
    if mode is not None and mode not in ("single", "sequential", "batch"):
        raise FactEditError(f"edit: mode must be single, sequential or batch, not {shown(mode)}")
    if circuits is not None:
        if not isinstance(circuits, (list, tuple)) or not all(c is None or isinstance(c, RecallCircuit)
                                                              for c in circuits):
            raise FactEditError(f"edit: circuits must be a list of RecallCircuit (or None), one per request, got "
                                f"{shown(circuits)}")
    if stats_corpus is not None:
        check_path_list(stats_corpus, "edit: stats_corpus")
    for value, label in ((out, "edit: out"), (fit_cache, "edit: fit_cache")):
        if value is not None:
            check_path_arg(value, label)
    return list(requests)


def _edit(requests, model, tokenizer, config, mode, circuits, stats_corpus, out, merge, overwrite, progress, log,
          append, fit_cache) -> EditResult:
    prior = None
    if append:
        from factedit.editing.history import load_sequence

        prior = load_sequence(out, log, what="--append: --out")
    if model is None or isinstance(model, (str, Path)):
        from factedit.models.loading import load_model

        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise FactEditError("edit: pass the tokenizer together with a loaded model")
    cfg = config or edit_config_for_model(model)
    check_target_true(requests, model, tokenizer, log)
    corpus = resolve_corpus(model, tokenizer, World.of(model), stats_corpus, model_fingerprint(model),
                            cfg.stats_samples, log=log)
    if prior is not None:
        return _append(prior, requests, model, tokenizer, corpus, cfg, circuits, out, merge, progress, log)
    result = compute_edit(requests, model, tokenizer, corpus, cfg=cfg, circuits=circuits, mode=mode,
                          progress=progress, log=log, fit_cache=fit_cache)
    check_moved(result)
    if out is not None:
        from factedit.editing.export import save_edit

        save_edit(result, out, model, tokenizer, merge=merge, circuits=result.circuits, overwrite=overwrite)
    return result


def _append(prior, requests, model, tok, corpus, cfg, circuits, out, merge, progress, log) -> EditResult:
    """Continue the sequence ``prior`` (stored in ``out``) with ``requests``."""
    from factedit.editing.export import manifest, write_folder
    from factedit.editing.history import SequenceError, appended_manifest, compose
    from factedit.editing.weights import applied

    fp = model_fingerprint(model)
    if prior.manifest.get("base_fingerprint") != fp:
        raise SequenceError(f"the sequence in {out} was made on another base model (fingerprint "
                            f"{prior.manifest.get('base_fingerprint')}, this model {fp}): pass its base model")
    with applied(model, prior.delta()):
        result = compute_edit(requests, model, tok, corpus, cfg=cfg, circuits=circuits, mode="sequential",
                              progress=progress, log=log, sequence=prior.state())
    check_moved(result)
    result.base_fingerprint = fp
    steps, keys = prior.steps + result.steps, prior.step_keys + result.step_keys
    delta = compose(steps, result.delta.conv1d)
    man = appended_manifest(prior.manifest, manifest(result, result.circuits), delta)
    write_folder(out, delta, man, model, tok, merge=merge, overwrite=True, sequence=(steps, keys))
    return result


MOVED_NLL = 1e-3  # the least fall of the target's NLL (nats) that counts as moving it
ALREADY_MET_NLL = 0.1  # a target the model already gives p >= 0.9 needs no move


def check_moved(result: EditResult) -> None:
    """An edit that did not move its target is a failure, not a success: a fit that diverged
    (an absurd ``lr``) or stalled leaves the target's NLL where it was, or an update of zero.
    Refused before anything is saved (exit code 1 at the command line)."""
    bad = []
    for i, (req, nll) in enumerate(zip(result.requests, result.nll)):
        before, after = float(nll["before"]), float(nll["after_fit"])
        if not math.isfinite(after) or (after > before - MOVED_NLL and after > ALREADY_MET_NLL):
            bad.append(f"request {i} ({shown(req.filled_prompt)} -> {shown(req.target_new)}): target NLL "
                       f"{before:.2f} -> {after:.2f}")
    norms = result.delta.norms()
    if not bad and (not norms or not any(v > 0 for v in norms.values())) and any(
            float(n["before"]) > ALREADY_MET_NLL for n in result.nll):
        bad.append("the update is zero")
    if bad:
        raise EditFailedError(f"the edit did not move its target ({'; '.join(bad[:3])}"
                              + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
                              + "): nothing was saved; check edit.fit.lr and edit.fit.steps in the recipe "
                              "(a diverging fit leaves the target where it was), or the target")


@torch.no_grad()
def check_target_true(requests: list[EditRequest], model, tok, log: Callable[[str], None]) -> None:
    """Warn when a request's ``target_true`` is not what the model predicts (its first token is
    not the model's top next token): the edit then changes a fact the model does not hold."""
    from factedit.analysis.spans import target_token_ids
    from factedit.models.adapter import context_length

    device = next(model.parameters()).device
    for i, req in enumerate(requests):
        if req.target_true is None:
            continue
        prompt = req.filled_prompt
        try:
            want = target_token_ids(tok, prompt, req.target_true)[0]
        except FactEditError:
            continue
        ids = tok(prompt, return_tensors="pt")["input_ids"].to(device)
        limit = context_length(model)
        if limit is not None and ids.shape[1] > limit:
            continue  # refused later, with the fix
        top = int(model(input_ids=ids).logits[0, -1].argmax())
        if top != want:
            log(f"warning: request {i}: the model predicts {tok.decode([top])!r} after {shown(prompt)}, not the "
                f"target_true {shown(req.target_true)}: the edit changes a fact the model does not hold as given")
