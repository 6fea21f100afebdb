"""Saving an edit: a standard PEFT LoRA adapter, the `edits.json` manifest and, on request,
a merged full checkpoint.

- ``adapter_model.safetensors`` holds, per edited module, ``lora_A`` (r, in) and ``lora_B``
  (out, r) with ``lora_alpha = r`` (scaling 1), so ``lora_B @ lora_A`` is the update exactly.
  Modules of different rank use peft's ``rank_pattern``/``alpha_pattern``; GPT-2's Conv1D
  needs ``fan_in_fan_out``. ``PeftModel.from_pretrained(base, DIR)`` loads it with nothing
  from factedit installed.
- ``merged/`` (``--merge``) is the base model with the update added, saved by
  ``save_pretrained`` (safetensors) with the tokenizer.
- ``edits.json`` records the SHA-256 of the adapter's files, the history's and its own content
  (``integrity``; :func:`factedit.integrity.seal_manifest`): ``verify`` and a continued or undone
  sequence refuse a folder whose files were changed since.

The folder is built in a hidden sibling and renamed into place in one step (see
:func:`factedit.io.commit_dir`): a run killed at any point leaves the old folder (or none) or
the complete new one, never a mix.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from factedit._version import __version__
from factedit.editing.edit import EditResult
from factedit.editing.history import SEQUENCE_FILE, compose, sequence_bytes
from factedit.editing.weights import NonFiniteEditError, WeightDelta, applied
from factedit.errors import EditFailedError
from factedit.integrity import seal_manifest
from factedit.io import atomic_write_bytes, atomic_write_text, commit_dir, dumps_json, staging_dir
from factedit.paths import world_file

EDITS_FORMAT = "factedit.edits/1"
PEFT_PREFIX = "base_model.model."  # peft's prefix of the base model's module names in an adapter


def peft_key(module: str, part: str) -> str:
    """The adapter state-dict key of LoRA factor ``part`` ("A" or "B") of ``module``, as peft
    names it: ``base_model.model.<module>.lora_<part>.weight``."""
    return f"{PEFT_PREFIX}{module}.lora_{part}.weight"


def parse_peft_key(key: str) -> tuple[str, str] | None:
    """``(module, part)`` of a key that :func:`peft_key` writes; for a LoRA key of another shape
    (``...lora_A.bias``), part is what follows ``lora_`` (so it is not "A" or "B"); None for a
    key that is not a LoRA factor of the base model."""
    if not key.startswith(PEFT_PREFIX) or ".lora_" not in key:
        return None
    module, part = key[len(PEFT_PREFIX):].rsplit(".lora_", 1)
    return module, part.removesuffix(".weight") if part in ("A.weight", "B.weight") else part


def adapter_tensors(delta: WeightDelta) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(delta.modules()):
        b, a = delta.merged_factors(name)
        out[peft_key(name, "A")] = a.contiguous()
        out[peft_key(name, "B")] = b.contiguous()
    return out


def adapter_config(delta: WeightDelta, base_model: str) -> dict:
    from peft import LoraConfig

    ranks = {name: delta.merged_factors(name)[0].shape[1] for name in sorted(delta.modules())}
    r = max(ranks.values())
    cfg = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(ranks), rank_pattern=ranks, alpha_pattern=dict(ranks),
        fan_in_fan_out=delta.conv1d, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model, inference_mode=True,
    )
    d = cfg.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}


def manifest(result: EditResult, circuits: list | None) -> dict:
    return {
        "format": EDITS_FORMAT,
        "factedit_version": __version__,
        "base_model": result.base_model,
        "base_fingerprint": result.base_fingerprint,
        "method": result.config.method,
        "mode": result.mode,
        "config": asdict(result.config),
        "requests": [r.to_dict() for r in result.requests],
        "plans": [asdict(p) for p in result.plans],
        "circuits": [None if c is None else c.to_dict()
                     for c in (circuits or result.circuits or [None] * len(result.requests))],
        "modules": {n: {"rank": int(result.delta.merged_factors(n)[0].shape[1]), "norm": v}
                    for n, v in sorted(result.delta.norms().items())},
        "fit_nll": result.nll,
        "statistics": result.stats,
        "seconds": round(result.seconds, 3),
        **({"sequence": {"steps": len(result.steps), "conv1d": result.delta.conv1d, "file": SEQUENCE_FILE,
                         "step_seconds": [round(x, 4) for x in result.step_seconds],
                         "strategy": result.config.sequential_strategy}}
           if result.mode == "sequential" and result.steps else {}),
    }


OWN = frozenset({"adapter_model.safetensors", "adapter_config.json", "edits.json", "merged",
                 SEQUENCE_FILE})  # an edit's files


def save_edit(result: EditResult, out: str | Path, model, tok, *, merge: bool = False,
              circuits: list | None = None, overwrite: bool = False) -> list[Path]:
    """Write the adapter (and ``merged/``) into ``out``; returns the paths written.

    The whole folder is built in a hidden sibling and put in place in one step, so ``out`` is
    only ever the old folder (or none) or the complete new one. With ``overwrite``, files in
    ``out`` that are not an edit's own (:data:`OWN`) are kept.
    """
    if result.mode == "sequential" and result.steps:  # the adapter as a function of the steps (history.py)
        return write_folder(out, compose(result.steps, result.delta.conv1d), manifest(result, circuits), model, tok,
                            merge=merge, overwrite=overwrite, sequence=(result.steps, result.step_keys))
    return write_folder(out, result.delta.compact(), manifest(result, circuits), model, tok, merge=merge,
                        overwrite=overwrite)


def write_folder(out: str | Path, delta: WeightDelta, man: dict, model, tok, *, merge: bool = False,
                 overwrite: bool = False, sequence: tuple[list[WeightDelta], list[dict]] | None = None,
                 ) -> list[Path]:
    """Write an edit's folder (adapter, manifest ``man``, ``merged/`` with ``merge``, and a
    sequence's history), built in a hidden sibling and put in place in one step."""
    out = Path(out)
    delta.check_finite()
    if not delta.modules():
        raise EditFailedError("no weight was changed (the model already gives every request's target): nothing "
                              "was saved")
    files = {"adapter_model.safetensors": safetensors_bytes(adapter_tensors(delta), metadata={"format": "pt"}),
             "adapter_config.json": dumps_json(adapter_config(delta, man["base_model"]), indent=1,
                                               sort_keys=True).encode("utf-8")}
    if sequence is not None:
        files[SEQUENCE_FILE] = sequence_bytes(*sequence)
    man = seal_manifest(man, files)  # the files' SHA-256, checked when the folder is read back
    staged = staging_dir(out)
    try:
        for name, data in files.items():
            if name.endswith(".json"):
                atomic_write_text(staged / name, data.decode("utf-8"))
            else:
                atomic_write_bytes(staged / name, data)
        if merge:
            _write_merged(delta, staged / "merged", model, tok)
        atomic_write_text(staged / "edits.json", dumps_json(man, indent=1))
        names = sorted(p.name for p in staged.iterdir())
        commit_dir(staged, out, own=OWN, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return [out / n for n in names]


def save_merged(delta: WeightDelta, dest: Path, model, tok, *, overwrite: bool = False) -> Path:
    """The edited full checkpoint in ``dest`` (built in a hidden sibling, then put in place)."""
    dest = Path(dest)
    staged = staging_dir(dest)
    try:
        _write_merged(delta, staged, model, tok)
        commit_dir(staged, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return dest


@torch.no_grad()
def _write_merged(delta: WeightDelta, dest: Path, model, tok) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    with applied(model, delta):
        for name in delta.modules():  # e.g. a float16 weight overflowing once the update is added
            if not torch.isfinite(model.get_submodule(name).weight).all():
                raise NonFiniteEditError(f"the merged weight of {name} contains NaN or inf (the update overflows "
                                         f"{model.get_submodule(name).weight.dtype}): nothing was saved; use a "
                                         "wider --dtype, or save the adapter without --merge")
        model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    world = world_file(model)
    if world is not None:  # a world model keeps its world (the base facts) for the world tools
        shutil.copyfile(world, dest / "world.json")
