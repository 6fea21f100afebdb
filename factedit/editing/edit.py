"""`edit`: targeted low-rank updates to a fact's located recall circuit.

Modes:
- ``single`` (one request) and ``sequential`` (one after another, each on the model edited
  so far): per request, fit the new values at the circuit's sites (the enrichment MLP's
  output and the extraction heads' value vectors at the subject), then insert each with
  ROME's rank-one closed form; head keys are read after the MLP update is in place.
  A sequence at scale sweeps the layers instead (``edit.sequential_strategy``, see
  :mod:`factedit.editing.sequential`).
- ``batch`` (many requests at once), by least squares over the batch's MLP layers:
  ``spread`` (MEMIT): fit the new residual at the top layer, then spread it over the layers;
  ``refit``: at each layer in turn, fit what the requests still need there (with the earlier
  layers' updates in place) and insert it. Heads are not updated in this mode.
- method ``lora``: the plain LoRA fine-tuning baseline through peft, for comparison;
  method ``ft``: constrained fine-tuning of one MLP (FT-L), the other baseline.

The base model's weights are the same after the call as before it (bit for bit).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from factedit.analysis.circuit import CircuitError, RecallCircuit
from factedit.editing.config import EditConfig, HeadPosition, InsertKeys
from factedit.editing.fit_cache import FIT_FIELDS, FitCache
from factedit.editing.insert import (
    context_keys,
    least_squares,
    mean_hidden,
    mean_keys,
    mlp_to_residual,
    rank_one,
    residual_to_mlp,
)
from factedit.editing.plan import EditPlan, attended_offsets, plan_for
from factedit.editing.requests import EditRequest, RequestError, held_requests
from factedit.editing.sequential import SequenceState, sequential_sweep
from factedit.editing.stats import Corpus, StatsReport, second_moments
from factedit.editing.values import FittedValues, ValueSites, build_rows, context_prefixes, fit_values
from factedit.editing.weights import WeightDelta, apply, restore
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout, context_length
from factedit.models.fingerprint import model_fingerprint
from factedit.recipes import RecipeError


@dataclass
class EditResult:
    delta: WeightDelta
    requests: list[EditRequest]
    plans: list[EditPlan]
    config: EditConfig
    mode: str
    base_fingerprint: str
    base_model: str
    nll: list[dict] = field(default_factory=list)  # per request: target NLL before/after fitting
    stats: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    circuits: list[RecallCircuit | None] = field(default_factory=list)
    # sequential: each request's own update, and the keys it added to the kept sets
    steps: list[WeightDelta] = field(default_factory=list)
    step_keys: list[dict] = field(default_factory=list)  # per request: {("mlp", layer, position): (n, in)}
    step_seconds: list[float] = field(default_factory=list)
    step_layers: list[list[int]] = field(default_factory=list)  # refit/nullspace: the layers each request wrote
    sequence: SequenceState | None = None  # the kept keys after the last request
    # batch (spread): the values fitted at the top layer, and where ((layer, position)), so that
    # another insertion of the same batch can reuse them (compute_edit's ``reuse_fit``)
    fit: FittedValues | None = None
    fit_site: tuple[int, str] | None = None


class _Stats:
    """Second moments, computed on first use for all the sites asked for so far."""

    def __init__(self, adapter, tok, corpus: Corpus, fingerprint: str, cfg: EditConfig, progress: bool):
        self.adapter, self.tok, self.corpus, self.fp, self.cfg, self.progress = (
            adapter, tok, corpus, fingerprint, cfg, progress)
        self.C: dict[tuple[str, int], torch.Tensor] = {}
        self.reports: list[StatsReport] = []

    def prepare(self, sites: list[tuple[str, int]]) -> None:
        todo = [s for s in dict.fromkeys(sites) if s not in self.C]
        if todo:
            got, rep = second_moments(self.adapter, self.tok, self.corpus, todo, self.fp,
                                      self.cfg.stats_samples, self.cfg.stats_max_length, progress=self.progress)
            self.C.update(got)
            self.reports.append(rep)

    def __getitem__(self, site: tuple[str, int]) -> torch.Tensor:
        self.prepare([site])
        return self.C[site]


def compute_edit(requests: list[EditRequest], model, tok, corpus: Corpus, *, cfg: EditConfig | None = None,
         circuits: list[RecallCircuit | None] | None = None, mode: str | None = None,
         progress: bool = True, log: Callable[[str], None] = lambda m: None,
         sequence: SequenceState | None = None, reuse_fit: EditResult | None = None,
         fit_cache: str | Path | None = None) -> EditResult:
    """Compute the edit of ``requests`` on ``model``. ``circuits`` (one per request, or None to
    locate each fact here) say where; ``mode`` defaults to single/batch by count. ``sequence``
    (sequential mode): the kept keys of the edits already applied to ``model``, to continue
    a sequence. ``reuse_fit`` (a batch spread): an earlier batch result of the same requests
    whose fitted values to reuse, e.g. to compare two insertions on one fit; its site and fit
    settings must match (an error says which does not). ``fit_cache`` (a directory): value fits
    on the unedited model (single edits, a batch's spread) are kept there chunk by chunk and
    read back by a later run of the same fit, so a long batch fit resumes where it stopped
    (:mod:`factedit.editing.fit_cache`)."""
    from factedit.analysis.locate import config_for_model, locate

    cfg = cfg or EditConfig()
    cfg.validate()
    if not requests:
        raise FactEditError("no edit requests given")
    adapter = ModelLayout(model)
    cfg.check_layers(adapter.n_layers)
    mode = mode or ("single" if len(requests) == 1 else "batch")
    if mode not in ("single", "sequential", "batch"):
        raise FactEditError(f"edit mode must be single, sequential or batch, not {mode!r}")
    if mode == "single" and len(requests) > 1:
        raise FactEditError("mode 'single' takes one request: use 'batch' or 'sequential' for several")
    t0 = time.perf_counter()
    targets = check_requests(requests, model, tok, context_prefixes(tok, list(corpus.texts), cfg), cfg.kl_prompt)
    fp = model_fingerprint(model)
    if circuits is None and cfg.method not in ("lora", "ft"):
        lc = config_for_model(model)
        lc.trace = lc.trace or (cfg.mlp_site == "trace" and cfg.method in ("circuit", "mlp"))
        circuits = [locate(r.prompt, r.subject, model=model, tokenizer=tok, config=lc, fingerprint=fp)
                    for r in requests]  # the fact as the model recalls it now
    circuits = circuits or [None] * len(requests)
    if len(circuits) != len(requests):
        raise FactEditError(f"{len(circuits)} circuits for {len(requests)} requests: give one per request")
    for i, (c, r) in enumerate(zip(circuits, requests)):
        if c is not None:
            c.check_model(fp)
            check_circuit(c, r, adapter, i)
    plans = [plan_for(c, cfg, adapter.n_layers) for c in circuits]
    check_one_token_sites(requests, targets, plans, mode, tok)
    cache = None if fit_cache is None else FitCache(Path(fit_cache), fp, log=log)
    res = EditResult(WeightDelta(conv1d=adapter.spec.conv1d), requests, plans, cfg, mode, fp,
                     str(getattr(model, "name_or_path", "")), circuits=list(circuits))
    if cfg.method == "lora":
        from factedit.editing.lora_ft import lora_finetune

        res.delta, res.nll = lora_finetune(adapter, tok, requests, corpus, cfg)
    elif cfg.method == "ft":
        from factedit.editing.ft_l import ft_l

        res.delta, res.nll = ft_l(adapter, tok, requests, cfg)
    elif mode == "batch":
        _batch(adapter, tok, corpus, requests, circuits, cfg, res, progress, log, reuse_fit, cache)
    elif mode == "sequential" and cfg.sequential_strategy != "kept":
        _sequence(adapter, tok, corpus, requests, cfg, res, progress, log, sequence or SequenceState())
    else:  # a kept sequence edits the model between fits: only a single edit's fit is cached
        check_sites(requests, plans, cfg)
        _one_by_one(adapter, tok, corpus, requests, cfg, res, progress, log, cache if mode == "single" else None,
                    sequence if mode == "sequential" else None)
    res.delta.check_finite()
    res.seconds = time.perf_counter() - t0
    return res


def _where(i: int, req: EditRequest) -> str:
    return f"request {i}" + ("" if req.case_id in (None, i) else f" (case_id {req.case_id!r})")


def check_requests(requests: list[EditRequest], model, tok, prefixes: list[str], kl_prompt: str) -> list[list[int]]:
    """Refuse, before any work and naming the request, what the tokenizer or the model cannot
    take: a subject the tokenizer does not find, a target that tokenizes to nothing (or only to
    the unknown token), a prompt that with a context prefix and the target exceeds the context.
    Returns each request's target tokens."""
    limit = context_length(model)
    unk = getattr(tok, "unk_token_id", None)
    targets = []
    for i, r in enumerate(requests):
        try:
            rows = build_rows(tok, [r], prefixes, kl_prompt)
        except FactEditError as exc:
            raise RequestError(f"{_where(i, r)}: {exc}") from None
        target = [t for _, t in rows[0].targets]
        if unk is not None and all(t == unk for t in target):
            raise RequestError(f"{_where(i, r)}: the target {r.target_new!r} tokenizes to the unknown token only: "
                               "give a target written with the tokenizer's vocabulary")
        longest = max(len(row.ids) for row in rows)
        if limit is not None and longest > limit:
            raise RequestError(
                f"{_where(i, r)}: the prompt with the target and a context prefix is {longest} tokens long, more "
                f"than the model's context of {limit}: shorten the prompt (or lower edit.keys.prefix_tokens)")
        targets.append(target)
    return targets


def check_one_token_sites(requests: list[EditRequest], targets: list[list[int]], plans: list[EditPlan], mode: str,
                          tok) -> None:
    """An MLP update at the prompt's last position (a lookup edit) sets the next token only:
    refuse a target of several tokens there rather than save an edit of its first token."""
    if mode == "batch":  # every request at the most common position, as _batch does
        positions = [collections.Counter(p.mlp_position for p in plans).most_common(1)[0][0]] * len(plans)
    else:
        positions = [p.mlp_position if p.mlp_layer is not None else None for p in plans]
    for i, (r, t, pos) in enumerate(zip(requests, targets, positions)):
        if pos == "last" and len(t) > 1:
            pieces = [tok.decode([x]) for x in t]
            raise RequestError(
                f"{_where(i, r)}: the target {r.target_new!r} is {len(t)} tokens {pieces}, but this edit updates an "
                f"MLP at the prompt's last position (the model looks the fact up there), which sets one next "
                f"token: give a one-token target, e.g. {pieces[0].strip()!r}")


def check_sites(requests: list[EditRequest], plans: list[EditPlan], cfg: EditConfig) -> None:
    """Every request of a one-at-a-time edit must have a site to write (an MLP or a head)."""
    if cfg.method == "heads" and cfg.max_heads == 0:
        raise RecipeError("edit.method 'heads' edits only heads, but edit.site.max_heads is 0 (no head gets "
                          "an update; a recipe sets 0 to turn head updates off): set edit.site.max_heads to 1 or "
                          "more, e.g. --set max_heads=2, or use method circuit or mlp")
    for i, (r, p) in enumerate(zip(requests, plans)):
        if p.mlp_layer is None and not p.heads:
            raise RequestError(
                f"{_where(i, r)}: method {cfg.method!s} found no site to edit ({p.why or 'no head located'}): no "
                f"extraction head was located and no head reads the subject where subject knockout hurts; "
                f"edit this fact with method circuit or mlp")


def check_circuit(c: RecallCircuit, req: EditRequest, adapter: ModelLayout, i: int) -> None:
    """A circuit's layers and heads must exist in the model (a hand-edited file may name others)."""
    L, H = adapter.n_layers, adapter.n_heads
    fix = "run `factedit locate` on this model again"
    if c.n_layers != L or c.n_heads != H or len(c.knockout.subject) != L:
        raise CircuitError(f"circuit {i} describes {c.n_layers} layers x {c.n_heads} heads, the model has {L} x {H}: "
                           + fix)
    for h in c.extraction_heads:
        if not (0 <= h.layer < L and 0 <= h.head < H):
            raise CircuitError(f"circuit {i} names head {h.head} of layer {h.layer}, but the model has heads "
                               f"0..{H - 1} in layers 0..{L - 1}: " + fix)
    for m in c.enrichment_mlps:
        if not 0 <= m.layer < L:
            raise CircuitError(f"circuit {i} names MLP layer {m.layer}, but the model has layers 0..{L - 1}: " + fix)
    if not 1 <= int(c.knockout.window) <= L:
        raise CircuitError(f"circuit {i} has knockout window {c.knockout.window}, outside 1..{L}: " + fix)
    if c.subject != req.subject:
        raise CircuitError(f"circuit {i} was located for the subject {c.subject!r}, {_where(i, req)} edits "
                           f"{req.subject!r}: pass one circuit per request, in the requests' order")
    if c.prompt != req.filled_prompt:  # another relation or template of the same subject
        raise CircuitError(f"circuit {i} was located for the prompt {c.prompt!r}, {_where(i, req)} edits "
                           f"{req.filled_prompt!r}: locate this prompt (`factedit locate`), or pass the circuit "
                           "located for it")


def _value_sites(adapter, tok, req: EditRequest, plan: EditPlan, cfg: EditConfig) -> ValueSites:
    """Where one request's values are fitted: its plan's MLP layer, and the KV heads its heads
    read (each once, with the offset of its first head; with ``edit.head_position``
    "attended", the offsets of the subject tokens the heads attend to, noted in the plan)."""
    kv_of = {(la, adapter.kv_head(h)): n for n, (la, h) in reversed(list(enumerate(plan.heads)))}
    kv_sites = list(dict.fromkeys((la, adapter.kv_head(h)) for la, h in plan.heads))
    if plan.heads and cfg.head_position == HeadPosition.ATTENDED and not plan.head_offsets:
        plan.head_offsets = attended_offsets(adapter, tok, req, plan.heads)
        plan.why += f"; head values at the subject tokens they attend to (offsets {plan.head_offsets})"
    offsets = [plan.head_offsets[kv_of[s]] for s in kv_sites] if plan.head_offsets else []
    return ValueSites(plan.mlp_layer, kv_sites, plan.mlp_position, offsets)


def _one_by_one(adapter, tok, corpus, requests, cfg, res: EditResult, progress, log,
                cache: FitCache | None = None, sequence: SequenceState | None = None) -> None:
    stats = _Stats(adapter, tok, corpus, res.base_fingerprint, cfg, progress)
    stats.prepare([("mlp", p.mlp_layer) for p in res.plans if p.mlp_layer is not None]
                  + [("attn", la) for p in res.plans for la, _ in p.heads])
    prefixes = context_prefixes(tok, list(corpus.texts), cfg)
    base: dict[str, torch.Tensor] = {}
    # sequential: per site, the keys of the edits made so far (those of a folder's earlier steps
    # included, when the sequence is continued), which later edits must move little
    state = sequence or SequenceState()

    def kept(site: tuple[str, int, str]) -> tuple[torch.Tensor, float] | None:
        if not cfg.sequential_lambda or site not in state.gram:
            return None
        return state.gram[site], cfg.sequential_lambda

    def ctx_keys(req: EditRequest, kind: str, layer: int, position: str | int = "subject") -> torch.Tensor | None:
        """Each context's own key (edit.insert_keys "contexts"), else None (their mean is used)."""
        if cfg.insert_keys != "contexts":
            return None
        return context_keys(adapter, tok, req, prefixes, kind, layer, position)

    try:
        t_step = time.perf_counter()
        for i, (req, plan) in enumerate(zip(requests, res.plans)):
            sites = _value_sites(adapter, tok, req, plan, cfg)
            kv_sites, offsets = sites.heads, sites.head_offsets
            fitted = fit_values(adapter, tok, [req], prefixes, sites, cfg, cache=cache)
            res.nll.append({"before": fitted.base_nll[0], "after_fit": fitted.nll[0]})
            step = WeightDelta(conv1d=adapter.spec.conv1d)
            added: dict[tuple[str, int, str], torch.Tensor] = {}  # site -> the keys this step writes, (n, in)
            if plan.mlp_layer is not None:
                K = ctx_keys(req, "mlp", plan.mlp_layer, plan.mlp_position)
                k = K.mean(0) if K is not None else mean_keys(adapter, tok, [req], prefixes, "mlp", plan.mlp_layer,
                                                              plan.mlp_position)[0]
                null = None
                if plan.mlp_position == "last" and cfg.subject_conditional and plan.read_layers:
                    # the same prompt with the subject hidden from the last position must not
                    # fire the update: the new attribute is then read from the subject
                    null = mean_keys(adapter, tok, [req], prefixes, "mlp", plan.mlp_layer, "last",
                                     block_subject=plan.read_layers)
                site = ("mlp", plan.mlp_layer, str(plan.mlp_position))
                b, a = rank_one(stats[site[:2]], k, fitted.mlp[0], cfg.ridge, null, kept(site), context_keys=K)
                added[site] = k[None]
                step.add(adapter.module_name(plan.mlp_layer, adapter.spec.mlp_out), b, a)
                for name, w in apply(adapter.model, step).items():
                    base.setdefault(name, w)
            head_step = WeightDelta(conv1d=adapter.spec.conv1d)
            for j, (la, kv) in enumerate(kv_sites):  # keys read with the MLP update in place
                at = offsets[j] if offsets else "subject"  # the token its value is written at
                K = ctx_keys(req, "attn", la, at)
                k = K.mean(0) if K is not None else mean_keys(adapter, tok, [req], prefixes, "attn", la, at)[0]
                site = ("attn", la, "subject" if at == "subject" else f"subject{at}")
                b_h, a = rank_one(stats[site[:2]], k, fitted.heads[0, j], cfg.ridge, kept=kept(site), context_keys=K)
                added[site] = k[None] if site not in added else torch.cat([added[site], k[None]])
                name = adapter.module_name(la, adapter.spec.v_proj)
                b = torch.zeros(adapter.out_weight(adapter.v_proj(la)).shape[0], 1)
                b[adapter.value_rows(la, kv)] = b_h
                head_step.add(name, b, a)
            for name, w in apply(adapter.model, head_step).items():
                base.setdefault(name, w)
            res.delta.extend(step)
            res.delta.extend(head_step)
            step.extend(head_step)
            res.steps.append(step)
            for site, keys in added.items():
                state.keep(site, keys)
            res.step_keys.append(added)
            res.step_seconds.append(time.perf_counter() - t_step)
            t_step = time.perf_counter()
            if len(requests) > 1:
                log(f"edit {i + 1}/{len(requests)}: {req.filled_prompt!r} -> {req.target_new!r} "
                    f"(NLL {fitted.base_nll[0]:.2f} -> {fitted.nll[0]:.2f})")
    finally:
        restore(adapter.model, base)
    res.stats = [asdict(r) for r in stats.reports]


def _sequence(adapter, tok, corpus, requests, cfg, res: EditResult, progress, log, state: SequenceState) -> None:
    """Sequential edits by a layer sweep (refit, or AlphaEdit's null space); heads are not
    updated. Each request keeps the position its circuit chose (the last position for a lookup)."""
    layers = cfg.sequential_layers or cfg.batch_layers or list(range(adapter.n_layers))
    stats = _Stats(adapter, tok, corpus, res.base_fingerprint, cfg, progress)
    stats.prepare([("mlp", la) for la in layers])
    positions = [p.mlp_position for p in res.plans]
    how = "AlphaEdit null-space projection" if cfg.sequential_strategy == "nullspace" else "least squares"
    for p in res.plans:
        p.heads = []
    base: dict[str, torch.Tensor] = {}
    last = [time.perf_counter()]  # when the previous request ended

    def timed(msg: str) -> None:  # called once per request, as it ends
        now = time.perf_counter()
        res.step_seconds.append(now - last[0])
        last[0] = now
        log(msg)

    try:
        steps, added, nlls, wrote = sequential_sweep(adapter, tok, corpus, requests, positions, stats.__getitem__,
                                                     cfg, state, base, timed)
    finally:
        restore(adapter.model, base)
    for p, used in zip(res.plans, wrote):
        p.mlp_layer = used[-1] if used else None
        p.why = (f"sequential sweep over MLP layers {layers} at the {p.mlp_position} position ({how}, earlier "
                 f"edits' keys kept); wrote layers {used}")
    res.steps, res.step_keys, res.nll, res.sequence, res.step_layers = steps, added, nlls, state, wrote
    for st in steps:
        res.delta.extend(st)
    res.stats = [asdict(r) for r in stats.reports]


def batch_layers(cfg: EditConfig, plans: list[EditPlan]) -> list[int]:
    """The MLP layers a batch spreads over: the recipe's, else ``batch_span`` layers ending at
    the most common planned layer."""
    if cfg.batch_layers:
        return sorted(cfg.batch_layers)
    located = [p.mlp_layer for p in plans if p.mlp_layer is not None]
    top = collections.Counter(located).most_common(1)[0][0] if located else (cfg.mlp_layers or [0])[0]
    return list(range(max(0, top - cfg.batch_span + 1), top + 1))


def _reused(prior: EditResult | None, requests: list[EditRequest], site: tuple[int, str],
            cfg: EditConfig, fingerprint: str) -> FittedValues | None:
    """``prior``'s fitted values when they were fitted for these requests at this site with the
    same fit settings (else an error naming the difference); None without a prior."""
    if prior is None:
        return None
    diff = [f for f in FIT_FIELDS if getattr(prior.config, f) != getattr(cfg, f)]
    model = prior.base_fingerprint != fingerprint
    if prior.fit is None or model or prior.fit_site != site or prior.requests != requests or diff:
        why = ("it holds no spread fit" if prior.fit is None else "it was fitted on another model (fingerprint)"
               if model else f"its site is {prior.fit_site}, not {site}" if prior.fit_site != site
               else "its requests differ" if prior.requests != requests
               else f"its fit settings differ ({', '.join(diff)})")
        raise FactEditError(f"reuse_fit: the earlier result's values cannot serve this batch: {why}")
    return prior.fit


def _batch_plans(plans: list[EditPlan], layers: list[int], position, cfg: EditConfig) -> None:
    """Every request's plan made the batch's: the MLP ``layers`` at ``position``, no heads, and
    why."""
    how = ("refitted at each layer in turn" if cfg.batch_strategy == "refit"
           else f"MEMIT-style spread, residual fitted at L{layers[-1]}")
    if cfg.held_prompts:
        how += f", {cfg.held_prompts} held prompt(s) per request"
    if cfg.batch_insert_keys == InsertKeys.CONTEXTS:
        how += ", each context's key inserted"
    for p in plans:
        p.mlp_layer, p.heads, p.mlp_position = layers[-1], [], position
        p.why = f"batch: MLP layers {layers} at the {position} position, {how}"


def _batch(adapter, tok, corpus, requests, circuits, cfg, res: EditResult, progress, log,
           reuse_fit: EditResult | None = None, cache: FitCache | None = None) -> None:
    layers = batch_layers(cfg, res.plans)
    position = collections.Counter(p.mlp_position for p in res.plans).most_common(1)[0][0]
    _batch_plans(res.plans, layers, position, cfg)
    stats = _Stats(adapter, tok, corpus, res.base_fingerprint, cfg, progress)
    stats.prepare([("mlp", la) for la in layers])
    prefixes = context_prefixes(tok, list(corpus.texts), cfg)
    sweep = [(i, la) for _ in range(cfg.batch_passes) for i, la in enumerate(layers)]
    base: dict[str, torch.Tensor] = {}
    held = held_requests(requests, cfg.held_prompts, cfg.seed)  # prompts to leave as they are

    ctx = cfg.batch_insert_keys == InsertKeys.CONTEXTS  # each context's own key and residual

    def insert(la: int, resid: torch.Tensor) -> None:
        """resid (n, d) MLP output changes at the requests' keys, or (n, n_prefixes, d) at each
        context's key (edit.batch_insert_keys "contexts")."""
        if ctx:
            keys = mean_keys(adapter, tok, requests, prefixes, "mlp", la, position, per_prefix=True)  # (n, m, in)
            if resid.dim() == 2:  # one change for every context of a request
                resid = resid[:, None].expand(-1, len(prefixes), -1)
            w = len(prefixes) ** -0.5  # weight 1/m per context: a request counts once against λC
            keys, resid = (keys * w).flatten(0, 1), (resid * w).flatten(0, 1)  # (n m, in), (n m, d)
        else:
            keys = mean_keys(adapter, tok, requests, prefixes, "mlp", la, position)  # (n, in)
        if held:  # held keys (m, in) ask for no change: a zero residual
            keys = torch.cat([keys, mean_keys(adapter, tok, held, prefixes, "mlp", la, position)])
            resid = torch.cat([resid, resid.new_zeros(len(held), resid.shape[1])])
        b, a = least_squares(stats[("mlp", la)], keys, resid, cfg.batch_lambda, cfg.ridge)
        step = WeightDelta(conv1d=adapter.spec.conv1d)
        name = adapter.module_name(la, adapter.spec.mlp_out)
        step.add(name, b, a)
        for n_, w in apply(adapter.model, step).items():
            base.setdefault(n_, w)
        res.delta.add(name, b, a)

    try:
        if cfg.batch_strategy == "refit":
            # each layer in turn: fit what the requests still need at this layer's MLP output
            # (with the updates so far in place), then insert it by least squares. Every layer
            # adds its own key space, so a large λ (little change to other keys) can be afforded
            first = None
            for _i, la in sweep:
                fitted = fit_values(adapter, tok, requests, prefixes, ValueSites(la, [], position), cfg,
                                    progress=progress)
                first = first or fitted
                # a request the model already meets (NLL below stop_nll) asks for no change here:
                # its key stays in the solve with a zero residual, which holds its output in place
                done = torch.tensor(fitted.base_nll, device=fitted.mlp.device) < cfg.stop_nll
                insert(la, fitted.mlp.masked_fill(done[:, None], 0.0))
                log(f"layer {la}: {int(done.sum())} requests met, mean NLL "
                    f"{sum(fitted.base_nll) / len(requests):.2f} -> "
                    f"{sum(fitted.nll) / len(requests):.2f} fitted, residual norm "
                    f"{float(fitted.mlp.norm(dim=-1).mean()):.3f}")
            res.nll = [{"before": b, "after_fit": a} for b, a in zip(first.base_nll, fitted.nll)]
        else:
            z_layer = layers[-1]
            res.fit_site = (z_layer, str(position))
            fitted = _reused(reuse_fit, requests, res.fit_site, cfg, res.base_fingerprint) or fit_values(
                adapter, tok, requests, prefixes, ValueSites(z_layer, [], position), cfg, cache=cache,
                progress=progress)
            res.fit = fitted
            res.nll = [{"before": b, "after_fit": a} for b, a in zip(fitted.base_nll, fitted.nll)]
            log(f"fitted {len(requests)} residuals at L{z_layer}: mean NLL "
                f"{sum(fitted.base_nll) / len(requests):.2f} -> {sum(fitted.nll) / len(requests):.2f}")
            # the residual change the fitted MLP output change makes (itself, unless a post-norm
            # sits between them), and each layer's share turned back into an MLP output change
            # (n, d), or with contexts (n, n_prefixes, d): each context's own target
            z_target = mean_hidden(adapter, tok, requests, prefixes, z_layer, position, ctx) + mlp_to_residual(
                adapter, tok, requests, prefixes, z_layer, fitted.mlp, position, ctx)
            for i, la in sweep:
                cur = mean_hidden(adapter, tok, requests, prefixes, z_layer, position, ctx)
                resid = residual_to_mlp(adapter, tok, requests, prefixes, la, (z_target - cur) / (len(layers) - i),
                                        position)
                insert(la, resid)
                log(f"layer {la}: residual norm {float(resid.norm(dim=-1).mean()):.3f}")  # over contexts too
    finally:
        restore(adapter.model, base)
    res.delta = res.delta.compact()
    res.stats = [asdict(r) for r in stats.reports]
