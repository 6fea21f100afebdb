"""`factedit verify`: load the base model and the edit (an adapter folder or a merged
checkpoint), check every edit, and write ``report.json`` and a self-contained ``report.html``."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file

from factedit.analysis.circuit import RecallCircuit
from factedit.analysis.locate import config_for_model
from factedit.editing.requests import EditRequest, load_requests, parse_record
from factedit.editing.weights import WeightDelta, applied
from factedit.errors import FactEditError
from factedit.io import atomic_write_text
from factedit.models.adapter import ModelAdapter
from factedit.models.fingerprint import model_fingerprint
from factedit.verify.checks import EditReport, Neighbour, VerifyOptions, verify_edit, world_prompts


class AdapterMismatchError(FactEditError):
    pass


def check_adapter_folder(path: Path) -> tuple[Path, Path]:
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise FactEditError(f"{path} is not a PEFT adapter folder (needs adapter_config.json and "
                            "adapter_model.safetensors): pass a folder written by `factedit edit`")
    return cfg_path, w_path


def load_adapter_delta(path: str | Path, model) -> WeightDelta:
    """A PEFT LoRA adapter folder as a WeightDelta (B scaled by alpha / r)."""
    path = Path(path)
    cfg_path, w_path = check_adapter_folder(path)
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise FactEditError(f"{cfg_path} is not valid JSON ({exc}): pass a folder written by `factedit edit`") from None
    try:
        tensors = load_file(str(w_path))
    except Exception as exc:  # safetensors raises its own error types
        raise FactEditError(f"{w_path} is not a readable safetensors file: {exc}") from exc
    adapter = ModelAdapter(model)
    delta = WeightDelta(conv1d=adapter.spec.conv1d)
    names = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in tensors})
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise AdapterMismatchError(f"the adapter edits {name}, which this model does not have: it was made "
                                       "for another model") from exc
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        r = cfg.get("rank_pattern", {}).get(name, cfg.get("r", a.shape[0]))
        alpha = cfg.get("alpha_pattern", {}).get(name, cfg.get("lora_alpha", r))
        delta.add(name, b * (alpha / r), a)
    return delta


def verify(*, model, tok, adapter: str | Path | None = None, edited: str | Path | None = None,
           requests: list[EditRequest] | str | Path | None = None, options: VerifyOptions | None = None,
           log: Callable[[str], None] = lambda m: None) -> dict:
    opts = options or VerifyOptions()
    if (adapter is None) == (edited is None):
        raise FactEditError("give exactly one of --adapter DIR and --edited MERGED_DIR")
    folder = Path(adapter if adapter is not None else edited)
    if adapter is not None:
        check_adapter_folder(folder)
    manifest_path = folder / "edits.json" if adapter is not None else folder.parent / "edits.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    fp = model_fingerprint(model)
    if manifest is not None and manifest.get("base_fingerprint") not in (None, fp):
        raise AdapterMismatchError(
            f"the edit in {folder} was made on another base model (fingerprint {manifest['base_fingerprint']}, "
            f"this model {fp}): pass the base model it was made on with --model")
    if isinstance(requests, (str, Path)):
        requests = load_requests(requests)
    plans: list[dict | None]
    circuits: list[RecallCircuit | None]
    if requests is None:
        if manifest is None:
            raise FactEditError(f"no edits.json next to {folder}: pass --requests FILE")
        requests = [parse_record(r, i) for i, r in enumerate(manifest["requests"])]
        plans = manifest.get("plans") or [None] * len(requests)
        circuits = [None if c is None else RecallCircuit.from_dict(c) for c in manifest.get("circuits", [])]
        circuits = circuits or [None] * len(requests)
    else:
        plans, circuits = [None] * len(requests), [None] * len(requests)

    if adapter is not None:
        delta = load_adapter_delta(adapter, model)

        def ctx():
            @contextmanager
            def cm():
                with applied(model, delta):
                    yield None
            return cm()
    else:
        from factedit.models.loading import load_model

        edited_model, _ = load_model(edited)
        if edited_model.config.model_type != model.config.model_type:
            raise AdapterMismatchError(f"{edited} is a {edited_model.config.model_type} model, the base a "
                                       f"{model.config.model_type}")

        def ctx():
            return nullcontext(edited_model)

    world = _world(model)
    lc = config_for_model(model)
    reports: list[EditReport] = []
    for i, (req, plan, circuit) in enumerate(zip(requests, plans, circuits)):
        para = list(req.paraphrase_prompts)
        neigh = [Neighbour(p) for p in req.neighborhood_prompts]
        if world is not None and not para and not neigh:
            para, neigh = world_prompts(world, req)
        rep = verify_edit(model, tok, ctx, req, circuit, plan, lc, opts, para, neigh)
        reports.append(rep)
        log(f"[{i + 1}/{len(requests)}] {'PASS' if rep.passed else 'FAIL'} {req.filled_prompt!r} -> "
            f"{req.target_new!r}" + ("" if rep.passed else ": " + "; ".join(rep.reasons)))
    keys = ["efficacy_score", "paraphrase_score", "neighbourhood_score", "reliability_accuracy",
            "generalisation_accuracy", "locality_accuracy", "fluency_before", "fluency_after"]
    summary = {"n_edits": len(reports), "passed": sum(r.passed for r in reports)}
    for k in keys:
        vals = [r.metrics[k] for r in reports if r.metrics.get(k) is not None]
        summary[k] = sum(vals) / len(vals) if vals else None
    return {"format": "factedit.verify/1", "base_model": str(getattr(model, "name_or_path", "")),
            "base_fingerprint": fp, "edit": str(folder), "options": asdict(opts), "summary": summary,
            "edits": [asdict(r) for r in reports]}


def _world(model):
    from factedit.world.generate import World

    p = Path(str(getattr(model, "name_or_path", "") or "")) / "world.json"
    return World.load(p) if p.is_file() else None


def write_report(report: dict, out: str | Path) -> list[Path]:
    from factedit.verify.html import render_html

    out = Path(out)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    atomic_write_text(out / "report.html", render_html(report))
    return [out / "report.json", out / "report.html"]
