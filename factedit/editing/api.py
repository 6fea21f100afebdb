"""`factedit.edit`: the Python face of `factedit edit` (same options, same files)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from factedit.analysis.circuit import RecallCircuit
from factedit.editing.config import EditConfig
from factedit.editing.corpora import resolve_corpus
from factedit.editing.edit import EditResult, compute_edit
from factedit.editing.requests import EditRequest, load_requests
from factedit.errors import FactEditError
from factedit.models.fingerprint import model_fingerprint


def _world(model):
    from factedit.world.generate import World

    path = Path(str(getattr(model, "name_or_path", "") or "")) / "world.json"
    return World.load(path) if path.is_file() else None


def base_model_dir(model) -> Path | None:
    """The local folder of a model given as None (the demo model), a path, or a loaded model."""
    from factedit.paths import model_dir

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
         progress: bool = True, log: Callable[[str], None] = lambda m: None) -> EditResult:
    """Edit facts. ``requests``: one request, a list, or a request file (CounterFact or flat
    JSON/JSONL). ``model``: a loaded model (with ``tokenizer``), a path, or None for the demo
    model. With ``out`` the adapter (and ``merged/`` with ``merge``) is written there."""
    from factedit.paths import check_output_dir

    if isinstance(requests, (str, Path)):
        requests = load_requests(requests)
    elif isinstance(requests, EditRequest):
        requests = [requests]
    if out is not None:
        check_output_dir(out, overwrite, base_model_dir(model))
    if model is None or isinstance(model, (str, Path)):
        from factedit.models.loading import load_model

        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise FactEditError("edit: pass the tokenizer together with a loaded model")
    cfg = config or edit_config_for_model(model)
    corpus = resolve_corpus(model, tokenizer, _world(model), stats_corpus, model_fingerprint(model),
                            cfg.stats_samples, log=log)
    result = compute_edit(requests, model, tokenizer, corpus, cfg=cfg, circuits=circuits, mode=mode,
                          progress=progress, log=log)
    if out is not None:
        from factedit.editing.export import save_edit

        save_edit(result, out, model, tokenizer, merge=merge, circuits=result.circuits, overwrite=overwrite)
    return result
