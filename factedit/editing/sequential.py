"""Sequential edits at scale: one request after another, each on the model edited so far,
without undoing the ones before.

Strategies (``edit.sequential_strategy``):

- ``kept`` (ROME's rank-one update at the circuit's one site, solved against C + KₚᵀKₚ/λ: the
  earlier edits' keys there move little); in :mod:`factedit.editing.edit`.
- ``refit``: each edit sweeps the layers ``edit.sequential_layers``. At each layer it fits
  what the request still needs there (nothing, once its target's NLL is below ``stop_nll``)
  and inserts it by least squares, holding in place every key kept so far at that layer:

      ΔW = r aᵀ,  a = the first row of K (λC + w·Mₗ + KᵀK)⁻¹,  K = [k; held keys] (1 + h, in)

  Mₗ = Σ k kᵀ over the keys of the earlier edits and their held prompts at layer l (a running
  sum: its cost does not grow with the sequence), λ = ``sequential_lambda``, w =
  ``sequential_keep``; pass p of ``sequential_passes`` uses λ / ``sequential_lambda_decay``ᵖ
  (an edit the protective first pass did not take is finished by a looser one). Held
  prompts: the request's template asked about ``held_prompts`` subjects of earlier edits
  (zero residual), as in a batch.
- ``nullspace`` (AlphaEdit, Fang et al. 2025): the same sweep, but the update lives in the
  null space of the corpus keys instead of being weighted by C: P projects onto the
  eigenvectors of C with eigenvalues below ``nullspace_threshold`` times the largest, and

      ΔW = R K P (w·Mₗ P + KᵀK P + I)⁻¹   (rows: keys; AlphaEdit's eq. 14 transposed)

After a request's sweep, its keys (and its held prompts' keys) at every layer of the sweep,
read with its update in place, join Mₗ.

Each request's update is recorded as its own :class:`WeightDelta` (``EditResult.steps``),
with the keys it added (``EditResult.step_keys``): a sequence's folder keeps them
(:mod:`factedit.editing.history`), so that the last k edits can be undone exactly and a
sequence can be continued later.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from factedit.editing.config import EditConfig
from factedit.editing.insert import _solve, at_tokens, regularised
from factedit.editing.requests import EditRequest
from factedit.editing.values import ValueSites, context_prefixes, fit_values
from factedit.editing.weights import WeightDelta, apply
from factedit.models.adapter import ModelLayout

Site = tuple[str, int, str]  # ("mlp", layer, position)


@dataclass
class SequenceState:
    """What later edits of a sequence must keep: per site, the running sum of kept keys'
    outer products (in, in), in float64, and the requests edited so far, in order, with the
    position each was written at."""

    gram: dict[Site, torch.Tensor] = field(default_factory=dict)
    counts: dict[Site, int] = field(default_factory=dict)
    subjects: list[tuple[str, str]] = field(default_factory=list)  # (template, subject) edited, in order
    edited: list[tuple[EditRequest, str]] = field(default_factory=list)  # (request, position), in order

    def keep(self, site: Site, keys: torch.Tensor) -> None:
        """Add keys (n, in) to the site's kept set."""
        k = keys.double().cpu()
        g = self.gram.get(site)
        self.gram[site] = k.T @ k if g is None else g + k.T @ k
        self.counts[site] = self.counts.get(site, 0) + len(k)


def held_for(req: EditRequest, state: SequenceState, n: int, seed: int, index: int) -> list[EditRequest]:
    """``n`` prompts to leave as they are: the request's template asked about subjects of
    earlier edits, never a (template, subject) pair the sequence has edited."""
    if n <= 0:
        return []
    edited = set(state.subjects) | {(req.template, req.subject)}
    pool = list(dict.fromkeys(s for _, s in state.subjects if (req.template, s) not in edited))
    rng = random.Random(seed * 1_000_003 + index)
    return [EditRequest(req.template, s, req.target_new) for s in rng.sample(pool, min(n, len(pool)))]


@torch.no_grad()
def keys_at_layers(adapter: ModelLayout, tok, requests: list[EditRequest], prefixes: list[str],
                   layers: list[int], position: str) -> dict[int, torch.Tensor]:
    """{layer: (n, in)}: the MLP output projection's input at the last position (or the
    subject's last token) of each request's prompt, averaged over the prefixes; every layer
    read in the same forward passes."""
    keys = at_tokens(adapter, tok, requests, prefixes, {la: adapter.mlp_out(la) for la in layers}, "in",
                     position=position)
    return {la: x.cpu() for la, x in keys.items()}


def null_projector(C: torch.Tensor, threshold: float) -> torch.Tensor:
    """(in, in) projector onto the eigenvectors of C whose eigenvalues are below ``threshold``
    times the largest (AlphaEdit's null space of the preserved keys), in float64."""
    e, U = torch.linalg.eigh(C.double())
    small = U[:, e < threshold * e.max()]
    return small @ small.T


def sequential_row(C: torch.Tensor, gram: torch.Tensor | None, keys: torch.Tensor, cfg: EditConfig,
                   proj: torch.Tensor | None = None, lam: float | None = None) -> torch.Tensor:
    """(in,): the row a with ΔW = r aᵀ for keys (1 + h, in), the first the request's (residual
    r), the others held (residual 0); ``gram`` (in, in) the kept keys' Σ k kᵀ; ``lam`` λ (default
    ``cfg.sequential_lambda``)."""
    lam = cfg.sequential_lambda if lam is None else lam
    K = keys.double()
    n_in = K.shape[1]
    G = torch.zeros(n_in, n_in, dtype=torch.float64) if gram is None else cfg.sequential_keep * gram.double()
    if proj is None:
        M = lam * regularised(C, cfg.ridge) + G + K.T @ K  # (in, in), symmetric
        return _solve(M, K[:1].T)[:, 0]
    P = proj.double()
    S = (G + K.T @ K) @ P + torch.eye(n_in, dtype=torch.float64)  # (in, in): a = k P S^-1
    return _solve(S.T, P @ K[:1].T)[:, 0]


def _sweep_one(adapter: ModelLayout, tok, prefixes: list[str], req: EditRequest, pos: str,
               held: list[EditRequest], layers: list[int], stats, cfg: EditConfig, state: SequenceState,
               proj: dict[int, torch.Tensor], base: dict[str, torch.Tensor], step: WeightDelta,
               ) -> tuple[float, float, list[int]]:
    """One request's layer sweep (``sequential_passes`` passes), its updates applied in place and
    added to ``step``. Returns its target NLL before and after, and the layers it wrote."""
    first = last = None
    used: list[int] = []
    for p in range(cfg.sequential_passes):
        lam = cfg.sequential_lambda / cfg.sequential_lambda_decay ** p
        for la in layers:
            fitted = fit_values(adapter, tok, [req], prefixes, ValueSites(la, [], pos), cfg)
            first = first if first is not None else fitted.base_nll[0]
            last = fitted.nll[0]
            if fitted.base_nll[0] < cfg.stop_nll:
                last = fitted.base_nll[0]
                break
            keys = keys_at_layers(adapter, tok, [req, *held], prefixes, [la], pos)[la]  # (1 + h, in)
            site = ("mlp", la, pos)
            a = sequential_row(stats(("mlp", la)), state.gram.get(site), keys, cfg, proj.get(la), lam)
            one = WeightDelta(conv1d=adapter.spec.conv1d)
            one.add(adapter.module_name(la, adapter.spec.mlp_out), fitted.mlp[0].double()[:, None].float(),
                    a[None].float())
            for name, w in apply(adapter.model, one).items():
                base.setdefault(name, w)
            step.extend(one)
            used.append(la)
        else:
            continue
        break
    return first, last, used


def _keep(adapter: ModelLayout, tok, prefixes: list[str], req: EditRequest, pos: str, held: list[EditRequest],
          layers: list[int], state: SequenceState, added: dict[Site, torch.Tensor]) -> None:
    """Read the request's and its held prompts' keys at every layer of the sweep (its update in
    place), add them to the kept sets and to ``added``."""
    for la, k in keys_at_layers(adapter, tok, [req, *held], prefixes, layers, pos).items():
        site = ("mlp", la, pos)
        state.keep(site, k)
        added[site] = k if site not in added else torch.cat([added[site], k])


def checked(n: int, cfg: EditConfig) -> list[int]:
    """The earlier edits (indices among the ``n`` so far) that the re-assertion check after the
    ``n``-th edit reads: all of them, or with ``sequential_reassert_window`` W, the next W in
    rotation: a cursor walks the sequence, W edits per check, wrapping to the first edit at
    the end (edits added since join the walk), so that a check costs the same at the 1,000th
    edit as at the 100th and each edit is read about once per n / W checks. It depends on n
    alone, so a sequence continued from its folder checks what it would have."""
    w, every = cfg.sequential_reassert_window, max(1, cfg.sequential_reassert_every)
    if not w or w >= n:
        return list(range(n))
    cursor = 0
    for m in range(every, n + 1, every):  # the checks so far, each after the m-th edit
        idx = [(cursor + t) % m for t in range(min(w, m))]
        cursor = (cursor + w) % m
    return sorted(idx)


@torch.no_grad()
def drifted(adapter: ModelLayout, tok, prefixes: list[str], state: SequenceState, layer: int,
            cfg: EditConfig) -> list[tuple[int, float]]:
    """(index, NLL) of the earlier edits whose target NLL (mean over the contexts, as the value
    fit scores it) is now above ``sequential_reassert_nll`` although it was below once their
    sweep ended: the edits that later ones overwrote."""
    check = dataclasses.replace(cfg, steps=0, kl_weight=0.0)  # one scoring pass, no fit
    by_pos: dict[str, list[int]] = {}
    for i in checked(len(state.edited), cfg):
        _req, pos, after = state.edited[i]
        if after <= cfg.sequential_reassert_nll:
            by_pos.setdefault(pos, []).append(i)
    out = []
    for pos, idx in by_pos.items():
        now = fit_values(adapter, tok, [state.edited[i][0] for i in idx], prefixes, ValueSites(layer, [], pos),
                         check).base_nll
        out += [(i, n) for i, n in zip(idx, now) if n > cfg.sequential_reassert_nll]
    return sorted(out)


def sequential_sweep(adapter: ModelLayout, tok, corpus, requests: list[EditRequest], positions: list[str],
                     stats: Callable[[tuple[str, int]], torch.Tensor], cfg: EditConfig,
                     state: SequenceState, base: dict[str, torch.Tensor],
                     log: Callable[[str], None] = lambda m: None,
                     ) -> tuple[list[WeightDelta], list[dict[Site, torch.Tensor]], list[dict], list[list[int]]]:
    """Apply ``requests`` one after another to ``adapter.model`` (updates stay in place; the
    weights they touch are saved into ``base`` first). Returns, per request, its update, the
    keys it added to the kept sets, its NLLs and the layers it wrote. With
    ``sequential_reassert_every`` N, after every N-th edit of the sequence the earlier edits
    that later ones overwrote are swept again, as part of that edit's step (so that undoing it
    undoes them too)."""
    layers = cfg.sequential_layers or cfg.batch_layers or list(range(adapter.n_layers))
    prefixes = context_prefixes(tok, list(corpus.texts), cfg)
    proj: dict[int, torch.Tensor] = {}
    if cfg.sequential_strategy == "nullspace":
        proj = {la: null_projector(stats(("mlp", la)), cfg.nullspace_threshold) for la in layers}
    steps, added, nlls, wrote = [], [], [], []
    for i, (req, pos) in enumerate(zip(requests, positions)):
        t0 = time.perf_counter()
        held = held_for(req, state, cfg.held_prompts, cfg.seed, len(state.subjects))
        step = WeightDelta(conv1d=adapter.spec.conv1d)
        got: dict[Site, torch.Tensor] = {}
        first, last, used = _sweep_one(adapter, tok, prefixes, req, pos, held, layers, stats, cfg, state, proj,
                                       base, step)
        t1 = time.perf_counter()
        _keep(adapter, tok, prefixes, req, pos, held, layers, state, got)
        t2 = time.perf_counter()
        state.subjects.append((req.template, req.subject))
        state.edited.append((req, pos, last))
        nll = {"before": first, "after_fit": last}
        cost = {"sweep": t1 - t0, "keep": t2 - t1, "check": 0.0, "reassert": 0.0}  # seconds
        msg = (f"edit {i + 1}/{len(requests)}: {req.filled_prompt!r} -> {req.target_new!r} "
               f"(NLL {first:.2f} -> {last:.2f}; layers {used})")
        every = cfg.sequential_reassert_every
        if every and len(state.edited) % every == 0:
            again = []
            found = drifted(adapter, tok, prefixes, state, layers[0], cfg)
            t3 = time.perf_counter()
            cost["check"] = t3 - t2
            for j, now in found:
                old, opos, _ = state.edited[j]
                oheld = held_for(old, state, cfg.held_prompts, cfg.seed, j)
                _, after, oused = _sweep_one(adapter, tok, prefixes, old, opos, oheld, layers, stats, cfg, state,
                                             proj, base, step)
                _keep(adapter, tok, prefixes, old, opos, oheld, layers, state, got)
                state.edited[j] = (old, opos, after)
                again.append({"edit": j, "nll": now, "after_fit": after, "layers": oused})
            nll["reasserted"] = again
            cost["reassert"] = time.perf_counter() - t3
            msg += f"; re-asserted {len(again)} earlier edits"
        nll["seconds"] = {k: round(v, 4) for k, v in cost.items()}
        steps.append(step)
        added.append(got)
        nlls.append(nll)
        wrote.append(used)
        log(msg)
    return steps, added, nlls, wrote
