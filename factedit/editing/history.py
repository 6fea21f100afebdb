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

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from factedit.editing.requests import EditRequest
from factedit.editing.sequential import SequenceState
from factedit.editing.weights import WeightDelta
from factedit.errors import FactEditError

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


def load_sequence(folder: str | Path) -> Sequence:
    """The sequence stored in ``folder`` (written by a sequential edit)."""
    from factedit.io import read_json

    folder = Path(folder)
    man = read_json(folder / "edits.json", "the edit manifest")
    if not isinstance(man, dict) or man.get("mode") != "sequential" or not isinstance(man.get("sequence"), dict):
        raise SequenceError(f"{folder} does not hold a sequence of edits (edits.json with mode 'sequential' and "
                            "a 'sequence' record): only a folder written by `factedit edit --mode sequential` can "
                            "be continued or undone")
    n = man["sequence"].get("steps")
    path = folder / SEQUENCE_FILE
    try:
        tensors = safetensors_load(path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise SequenceError(f"{path} cannot be read ({str(exc)[:120]}): the sequence's history is lost; "
                            "the adapter itself still loads with peft") from None
    if not isinstance(n, int) or n < 1 or len(man.get("requests", [])) != n:
        raise SequenceError(f"{folder}/edits.json: the sequence record says {n!r} steps for "
                            f"{len(man.get('requests', []))} requests: the manifest was edited by hand")
    steps = [WeightDelta(conv1d=bool(man["sequence"].get("conv1d", False))) for _ in range(n)]
    step_keys: list[dict] = [{} for _ in range(n)]
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        idx, kind, rest = key.split("/", 2)
        i = int(idx)
        if not 0 <= i < n:
            raise SequenceError(f"{path} holds step {i}, but the sequence has {n} steps")
        if kind == "delta":
            name, which = rest.rsplit("/", 1)
            factors.setdefault((i, name), {})[which] = t
        else:
            k, la, pos = rest.split("/")
            step_keys[i][(k, int(la), pos)] = t
    for (i, name), f in sorted(factors.items()):
        if set(f) != {"A", "B"}:
            raise SequenceError(f"{path}: step {i} of {name} lacks a factor")
        steps[i].add(name, f["B"], f["A"])
    return Sequence(man, steps, step_keys)


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


def undo(folder: str | Path, k: int, model=None, tok=None) -> Sequence:
    """Undo the last ``k`` edits of the sequence in ``folder``, in place (one atomic step). A
    ``merged/`` checkpoint in the folder is rebuilt, which needs the base ``model`` and ``tok``."""
    from factedit.editing.export import write_folder

    folder = Path(folder)
    seq = load_sequence(folder)
    n = len(seq.steps)
    if not isinstance(k, int) or not 1 <= k < n:
        raise SequenceError(f"--undo {k}: the sequence in {folder} has {n} edits; undo 1 to {n - 1} of them "
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
