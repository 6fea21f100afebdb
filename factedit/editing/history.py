"""How a sequence of edits is stored, continued and undone.

A sequential edit's folder is a normal PEFT adapter (``adapter_model.safetensors``,
``adapter_config.json``) holding the sum of all its edits, plus:

- ``sequence.safetensors``: each step's own update (``NNNNNN/delta/MODULE/B``, ``.../A``)
  and the keys it added to the kept sets (``NNNNNN/keys/KIND/LAYER/POSITION``, (n, in)),
  which later edits of the sequence must keep;
- ``edits.json``: the requests, plans, circuits and fitted NLLs in step order, and a
  ``sequence`` record (steps, seconds per step, undo log).

The adapter is a deterministic function of the steps (:func:`compose`): per module, the
steps' factors side by side while their total rank is at most min(out, in), else the exact
float64 sum of their outer products in step order, stored at full rank (an identity factor).
So undoing the last k edits (:func:`undo`) rewrites the folder from the first n - k steps and
gives, bit for bit, the adapter (and ``merged/``) that those n - k steps gave when they were
saved. The folder is rewritten in one atomic step (:func:`factedit.io.commit_dir`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from factedit.editing.requests import EditRequest
from factedit.editing.sequential import SequenceState
from factedit.editing.weights import WeightDelta
from factedit.errors import FactEditError, shown
from factedit.validate import request_problem

SEQUENCE_FILE = "sequence.safetensors"
SEQUENCE_FORMAT = "factedit.sequence/1"


class SequenceError(FactEditError):
    pass


def compose(steps: list[WeightDelta], conv1d: bool) -> WeightDelta:
    """The sum of ``steps`` as one factor pair per module, computed the same way for the same
    steps whatever came after them (see the module's note)."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for st in steps:
        for name, fs in st.factors.items():
            parts.setdefault(name, []).extend(fs)
    out = WeightDelta(conv1d=conv1d)
    for name in sorted(parts):
        bs = torch.cat([b for b, _ in parts[name]], 1)  # (out, r)
        as_ = torch.cat([a for _, a in parts[name]], 0)  # (r, in)
        n_out, n_in = bs.shape[0], as_.shape[1]
        if bs.shape[1] <= min(n_out, n_in):
            out.factors[name] = [(bs, as_)]
            continue
        dense = torch.zeros(n_out, n_in, dtype=torch.float64)
        for j in range(bs.shape[1]):  # float32 x float32 products are exact in float64; a fixed order
            dense += bs[:, j : j + 1].double() * as_[j : j + 1].double()
        dense = dense.float()
        if n_out <= n_in:
            out.factors[name] = [(torch.eye(n_out), dense)]  # I @ ΔW == ΔW exactly
        else:
            out.factors[name] = [(dense, torch.eye(n_in))]
    return out


def site_key(site: tuple) -> str:
    return "/".join(str(x) for x in site)


def sequence_bytes(steps: list[WeightDelta], step_keys: list[dict]) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for i, (st, keys) in enumerate(zip(steps, step_keys)):
        for name in st.modules():
            b, a = st.merged_factors(name)
            tensors[f"{i:06d}/delta/{name}/B"] = b.contiguous()
            tensors[f"{i:06d}/delta/{name}/A"] = a.contiguous()
        for site, k in keys.items():
            tensors[f"{i:06d}/keys/{site_key(site)}"] = k.float().contiguous()
    return safetensors_bytes(tensors, metadata={"format": SEQUENCE_FORMAT, "steps": str(len(steps))})


@dataclass
class Sequence:
    """A sequence as stored in a folder."""

    manifest: dict
    steps: list[WeightDelta]
    step_keys: list[dict]

    @property
    def conv1d(self) -> bool:
        return bool(self.manifest.get("sequence", {}).get("conv1d", False))

    def delta(self) -> WeightDelta:
        return compose(self.steps, self.conv1d)

    def state(self) -> SequenceState:
        """The kept keys and edited (template, subject) pairs, to continue the sequence."""
        st = SequenceState()
        for keys in self.step_keys:
            for site, k in keys.items():
                st.keep(site, k)
        st.subjects = [(r["prompt"] if "{}" in r["prompt"] else r["prompt"].replace(r["subject"], "{}", 1),
                        r["subject"]) for r in self.manifest["requests"]]
        plans = self.manifest.get("plans") or []
        fits = self.manifest.get("fit_nll") or []
        for i, r in enumerate(self.manifest["requests"]):
            req = EditRequest(r["prompt"], r["subject"], r["target_new"])
            plan = plans[i] if i < len(plans) and isinstance(plans[i], dict) else {}
            pos = plan.get("mlp_position", "subject")
            fit = fits[i] if i < len(fits) and isinstance(fits[i], dict) else {}
            st.edited.append((req, pos, float(fit.get("after_fit", float("inf")))))
            for again in fit.get("reasserted", []):  # a later step swept an earlier edit again
                j = again["edit"]
                st.edited[j] = (st.edited[j][0], st.edited[j][1], float(again["after_fit"]))
        return st


def load_sequence(folder: str | Path, log: Callable[[str], None] = lambda m: None, what: str = "--out") -> Sequence:
    """The sequence stored in ``folder`` (written by a sequential edit), checked: every field a
    continuation or an undo reads has its type, the history's tensors their names and shapes,
    and the files the SHA-256 recorded in ``edits.json`` (a mismatch is refused; a folder
    without hashes, from an older factedit, is read with a warning through ``log``)."""
    from factedit.integrity import check_folder_integrity
    from factedit.io import read_json

    folder = Path(folder)
    man = read_json(folder / "edits.json", "the edit manifest")
    if not isinstance(man, dict) or man.get("mode") != "sequential" or not isinstance(man.get("sequence"), dict):
        raise SequenceError(f"{what} {folder} does not hold a sequence of edits (edits.json with mode 'sequential' "
                            "and a 'sequence' record): only a folder written by `factedit edit --mode sequential` "
                            "can be continued or undone")
    n = _check_manifest(man, folder)
    path = folder / SEQUENCE_FILE
    try:
        tensors = safetensors_load(path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise SequenceError(f"{path} cannot be read ({str(exc)[:120]}): the sequence's history is lost; "
                            "the adapter itself still loads with peft") from None
    steps, step_keys = _steps(tensors, n, bool(man["sequence"].get("conv1d", False)), path)
    check_folder_integrity(folder, man, log)
    return Sequence(man, steps, step_keys)


def _check_manifest(man: dict, folder: Path) -> int:
    """The number of steps of a sequence's manifest, after checking what a continuation and an
    undo read from it."""
    where = f"{folder / 'edits.json'}"
    fix = "the manifest was changed by hand or is damaged: restore the folder, or redo the edits"

    def bad(problem: str) -> SequenceError:
        return SequenceError(f"{where}: {problem}: {fix}")

    seq = man["sequence"]
    n = seq.get("steps")
    reqs = man.get("requests")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or not isinstance(reqs, list) or len(reqs) != n:
        raise bad(f"the sequence record says {shown(n)} steps for "
                  f"{len(reqs) if isinstance(reqs, list) else shown(reqs)} requests")
    if not isinstance(seq.get("conv1d", False), bool):
        raise bad(f"'sequence.conv1d' must be true or false, got {shown(seq.get('conv1d'))}")
    for key in ("step_seconds", "undone"):
        if not isinstance(seq.get(key, []), list):
            raise bad(f"'sequence.{key}' must be a list")
    if man.get("base_fingerprint") is not None and not isinstance(man["base_fingerprint"], str):
        raise bad("'base_fingerprint' must be a string")
    for i, r in enumerate(reqs):
        problem = (request_problem(r.get("prompt"), r.get("subject"), r.get("target_new"), None)
                   if isinstance(r, dict) else f"an object is expected, got {shown(r)}")
        if problem is not None:
            raise bad(f"request {i}: {problem}")
    for key in ("plans", "circuits", "fit_nll", "statistics"):
        if man.get(key) is not None and not isinstance(man[key], list):
            raise bad(f"'{key}' must be a list")
    for i, plan in enumerate(man.get("plans") or []):
        if plan is not None and (not isinstance(plan, dict)
                                 or not isinstance(plan.get("mlp_position", "subject"), (str, int))
                                 or isinstance(plan.get("mlp_position", "subject"), bool)):
            raise bad(f"plan {i} is malformed (an object whose 'mlp_position' is 'subject', 'last' or a position)")
    for i, fit in enumerate(man.get("fit_nll") or []):
        if fit is None:
            continue
        if not isinstance(fit, dict) or not _nll(fit.get("after_fit", 0.0)):
            raise bad(f"fit_nll {i} is malformed (an object with a numeric 'after_fit')")
        again = fit.get("reasserted", [])
        if not isinstance(again, list) or not all(
                isinstance(a, dict) and isinstance(a.get("edit"), int) and not isinstance(a.get("edit"), bool)
                and 0 <= a["edit"] < n and _nll(a.get("after_fit")) for a in again):
            raise bad(f"fit_nll {i}: 'reasserted' must list {{'edit': an earlier step, 'after_fit': a number}}")
    return n


def _nll(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def _steps(tensors: dict[str, torch.Tensor], n: int, conv1d: bool,
           path: Path) -> tuple[list[WeightDelta], list[dict]]:
    """Each step's update and kept keys, from the history file's tensors (names and shapes checked)."""
    fix = "the history was changed or is damaged: restore the folder, or redo the edits"
    steps = [WeightDelta(conv1d=conv1d) for _ in range(n)]
    step_keys: list[dict] = [{} for _ in range(n)]
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        parts = key.split("/", 2)
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in ("delta", "keys"):
            raise SequenceError(f"{path} holds the tensor {shown(key)}, which is not a step's update or keys: {fix}")
        i, kind, rest = int(parts[0]), parts[1], parts[2]
        if not 0 <= i < n:
            raise SequenceError(f"{path} holds step {i}, but the sequence has {n} steps: {fix}")
        if not t.is_floating_point() or t.dim() != 2 or not torch.isfinite(t).all():
            raise SequenceError(f"{path}: {shown(key)} is not a finite 2-D tensor (shape {tuple(t.shape)}): {fix}")
        if kind == "delta":
            name, _, which = rest.rpartition("/")
            if not name or which not in ("A", "B"):
                raise SequenceError(f"{path} holds the tensor {shown(key)}, which is not a LoRA factor: {fix}")
            factors.setdefault((i, name), {})[which] = t
        else:
            site = rest.split("/")
            if len(site) != 3 or site[0] not in ("mlp", "attn") or not site[1].isdigit():
                raise SequenceError(f"{path} holds the keys {shown(key)}, not of a site (mlp|attn)/LAYER/POSITION: "
                                    f"{fix}")
            step_keys[i][(site[0], int(site[1]), site[2])] = t
    for (i, name), f in sorted(factors.items()):
        if set(f) != {"A", "B"}:
            raise SequenceError(f"{path}: step {i} of {name} lacks a factor: {fix}")
        if f["B"].shape[1] != f["A"].shape[0]:
            raise SequenceError(f"{path}: the factors of step {i} of {name} do not chain ({tuple(f['B'].shape)} and "
                                f"{tuple(f['A'].shape)}): {fix}")
        steps[i].add(name, f["B"], f["A"])
    return steps, step_keys


def slice_manifest(man: dict, n: int) -> dict:
    """The manifest of the first ``n`` steps."""
    out = dict(man)
    for key in ("requests", "plans", "circuits", "fit_nll"):
        if isinstance(man.get(key), list):
            out[key] = man[key][:n]
    seq = dict(man["sequence"])
    seq["steps"] = n
    seq["step_seconds"] = list(seq.get("step_seconds", []))[:n]
    out["sequence"] = seq
    return out


def undo(folder: str | Path, k: int, model=None, tok=None, log: Callable[[str], None] = lambda m: None) -> Sequence:
    """Undo the last ``k`` edits of the sequence in ``folder``, in place (one atomic step), under
    the folder's lock (:func:`factedit.io.held_lock`: another factedit process continuing or
    undoing it is refused). A ``merged/`` checkpoint in the folder is rebuilt, which needs the
    base ``model`` and ``tok``."""
    from factedit.io import held_lock

    folder = Path(folder)
    with held_lock(folder, "--out"):
        return _undo(folder, k, model, tok, log)


def _undo(folder: Path, k: int, model, tok, log: Callable[[str], None]) -> Sequence:
    from factedit.editing.export import write_folder

    seq = load_sequence(folder, log)
    n = len(seq.steps)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        can = f"undo 1 to {n - 1} of them" if n > 1 else "none can be undone alone"
        raise SequenceError(f"--undo {shown(k)}: the sequence in {folder} has {n} edit{'s' if n > 1 else ''}; {can} "
                            "(to undo them all, use the base model: it was never changed)")
    merged = (folder / "merged").is_dir()
    if merged and model is None:
        raise SequenceError(f"{folder} holds merged/: pass the base model to rebuild it")
    if model is not None:
        from factedit.models.fingerprint import model_fingerprint

        fp = model_fingerprint(model)
        if seq.manifest.get("base_fingerprint") not in (None, fp):
            raise SequenceError(f"the sequence in {folder} was made on another base model (fingerprint "
                                f"{seq.manifest['base_fingerprint']}, this model {fp}): pass its base model")
    kept = Sequence(slice_manifest(seq.manifest, n - k), seq.steps[: n - k], seq.step_keys[: n - k])
    log = list(kept.manifest["sequence"].get("undone", []))
    log.append({"undone": k, "from": n})
    kept.manifest["sequence"]["undone"] = log
    write_folder(folder, kept.delta(), kept.manifest, model, tok, merge=merged, overwrite=True,
                 sequence=(kept.steps, kept.step_keys))
    return kept


def appended_manifest(prior: dict, new: dict, delta: WeightDelta) -> dict:
    """The manifest of ``prior``'s steps followed by ``new``'s, for the composed ``delta``."""
    out = dict(prior)
    for key in ("requests", "plans", "circuits", "fit_nll", "statistics"):
        out[key] = list(prior.get(key) or []) + list(new.get(key) or [])
    seq = dict(prior["sequence"])
    seq["steps"] = len(out["requests"])
    seq["step_seconds"] = list(seq.get("step_seconds", [])) + list(new["sequence"].get("step_seconds", []))
    out["sequence"] = seq
    out["seconds"] = round(float(prior.get("seconds", 0.0)) + float(new.get("seconds", 0.0)), 3)
    out["modules"] = {n: {"rank": int(delta.merged_factors(n)[0].shape[1]), "norm": v}
                      for n, v in sorted(delta.norms().items())}
    return out
