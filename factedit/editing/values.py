"""The new values an edit must write (ROME's v*, MEMIT's z), found by gradient steps.

For each request we add a free vector to a sublayer's output at the subject's last token,
in every prompt of that request (the edit prompt after several context prefixes), and fit it
with Adam so that the model predicts the new target:

    loss_i = mean NLL(target_new | prompt)                 (teacher-forced, every target token)
           + kl_weight * KL(p_base || p_new) on kl_prompt  (keeps the subject's other facts)
           + weight_decay * ||delta_i||^2 / ||v_i||^2

and after every step each delta's norm is clamped to ``clamp * ||v_i||`` (v_i: the current
output there). Sites: the MLP output of one layer, and/or the value vectors of chosen heads
(the head's slice of the value projection's output). The MLP site is the MLP module's own
output, the space its output projection writes (before a post-MLP norm, in Gemma 2/3): the
deltas are fitted through the model, norms included, and inserted where they were added.
Requests are independent: each has its own deltas and rows, so many are fitted in one batch.
"""

from __future__ import annotations

import dataclasses
import inspect
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from factedit.analysis.hooks import Hooks, as_btd, first_output, pad_right, padding_safe, with_output
from factedit.analysis.spans import target_token_ids, tokenize_with_subject
from factedit.editing.config import EditConfig, MlpPosition
from factedit.editing.fit_cache import FitCache, FittedValues
from factedit.editing.requests import EditRequest
from factedit.editing.targets import ScoredTargets
from factedit.models.adapter import ModelLayout


@dataclass
class Row:
    ids: list[int]
    s_last: int  # the subject's last token
    last: int  # the prompt's last token
    req: int  # index of the request in the batch
    targets: list[tuple[int, int]]  # (position whose next-token prediction is scored, token id)
    kl: bool = False
    s_first: int = 0  # the subject's first token

    def head_position(self, offset: int) -> int:
        """The subject token ``offset`` tokens before its last one (0: the last), kept within
        the subject (a context may tokenise the subject's first word differently)."""
        return max(self.s_first, self.s_last + offset)


@dataclass
class ValueSites:
    mlp_layer: int | None  # add a delta to this layer's MLP output
    heads: list[tuple[int, int]]  # (layer, kv head) value vectors
    mlp_position: MlpPosition = MlpPosition.SUBJECT  # where the MLP delta goes: the last subject token | "last"
    # per head site, where its delta goes: this many tokens before the subject's last (0, <= 0);
    # empty: every head at the subject's last token
    head_offsets: list[int] = dataclasses.field(default_factory=list)

    def offset(self, j: int) -> int:
        return self.head_offsets[j] if self.head_offsets else 0


def context_prefixes(tok, texts: list[str], cfg: EditConfig) -> list[str]:
    """"" plus ``n_prefixes`` random snippets of the corpus (deterministic by seed), cut to the
    token lengths in ``prefix_tokens``; each ends with a full stop so the prompt starts a
    sentence."""
    rng = random.Random(cfg.seed)
    out = [""]
    pool = [t for t in texts if t.strip()]
    for i in range(cfg.n_prefixes):
        if not pool:
            break
        n = cfg.prefix_tokens[i % len(cfg.prefix_tokens)]
        ids = tok.encode(rng.choice(pool), add_special_tokens=False)  # no BOS inside the snippet
        start = rng.randrange(max(1, len(ids) - n + 1))
        snippet = tok.decode(ids[start : start + n]).strip()
        if snippet:
            out.append(snippet.rstrip(".") + ".")
    return out


def build_rows(tok, requests: list[EditRequest], prefixes: list[str], kl_prompt: str | None) -> list[Row]:
    rows = []
    for i, r in enumerate(requests):
        for prefix in prefixes:
            text = f"{prefix} {r.filled_prompt}" if prefix else r.filled_prompt
            tp = tokenize_with_subject(tok, text, r.subject)
            tgt = target_token_ids(tok, tp.prompt, r.target_new)
            n = len(tp.input_ids)
            rows.append(Row(tp.input_ids + tgt[:-1], tp.last_subject, tp.last, i,
                            [(n - 1 + j, t) for j, t in enumerate(tgt)], s_first=tp.subject_span[0]))
        if kl_prompt:
            tp = tokenize_with_subject(tok, kl_prompt, r.subject)
            rows.append(Row(tp.input_ids, tp.last_subject, tp.last, i, [], kl=True, s_first=tp.subject_span[0]))
    return rows


@contextmanager
def add_at_subject(adapter: ModelLayout, sites: ValueSites, rows: list[Row], mlp_delta, head_delta,
                   ) -> Iterator[None]:
    """Add each row's request's deltas: the MLP delta at ``sites.mlp_position`` (the subject's
    last token or the last position), each head's delta at its subject token (``sites.offset``)."""
    device = next(adapter.model.parameters()).device
    B = len(rows)
    b_idx = torch.arange(B, device=device)
    s_idx = torch.tensor([r.s_last for r in rows], device=device)
    req = torch.tensor([r.req for r in rows], device=device)
    m_idx = s_idx if sites.mlp_position == "subject" else torch.tensor([r.last for r in rows], device=device)

    def mlp_hook(m, a, out):
        o = first_output(out)
        shape = o.shape
        o = as_btd(o, B).clone()
        o[b_idx, m_idx] = o[b_idx, m_idx] + mlp_delta[req].to(o.dtype)
        return with_output(out, o.reshape(shape))

    h_idx = [torch.tensor([r.head_position(sites.offset(j)) for r in rows], device=device)
             for j in range(len(sites.heads))]

    def v_hook(m, a, out, js, layer):
        o = out.clone()
        for j in js:
            cols = torch.tensor(adapter.value_rows(layer, sites.heads[j][1]), device=o.device)
            sel = o[b_idx, h_idx[j]][:, cols] + head_delta[req, j].to(o.dtype)  # (B, dh)
            o[b_idx[:, None], h_idx[j][:, None], cols[None, :]] = sel
        return o

    by_layer: dict[int, list[int]] = {}
    for j, (layer, _h) in enumerate(sites.heads):
        by_layer.setdefault(layer, []).append(j)
    with Hooks() as hooks:
        if sites.mlp_layer is not None and mlp_delta is not None:
            hooks.post(adapter.mlp(sites.mlp_layer), mlp_hook)
        if head_delta is not None:
            for layer, js in by_layer.items():
                hooks.post(adapter.v_proj(layer), partial(v_hook, js=js, layer=layer))
        yield


def _current(adapter: ModelLayout, sites: ValueSites, rows: list[Row], forward):
    """The unedited outputs at the subject (per row), and the KL rows' base distributions."""
    store: dict[str, torch.Tensor] = {}
    B = len(rows)
    device = next(adapter.model.parameters()).device
    b_idx = torch.arange(B, device=device)
    s_idx = torch.tensor([r.s_last for r in rows], device=device)
    m_idx = s_idx if sites.mlp_position == "subject" else torch.tensor([r.last for r in rows], device=device)

    def keep_mlp(m, a, out):
        store["mlp"] = as_btd(first_output(out), B)[b_idx, m_idx].detach()

    def keep_v(m, a, out, j, layer, kv):
        h_idx = torch.tensor([r.head_position(sites.offset(j)) for r in rows], device=device)
        store[f"v{j}"] = out[b_idx, h_idx][:, adapter.value_rows(layer, kv)].detach()

    with Hooks() as hooks:
        if sites.mlp_layer is not None:
            hooks.post(adapter.mlp(sites.mlp_layer), keep_mlp)
        for j, (layer, kv) in enumerate(sites.heads):
            hooks.post(adapter.v_proj(layer), partial(keep_v, j=j, layer=layer, kv=kv))
        logits = forward()
    return store, logits.detach()


def fit_chunk_size(adapter: ModelLayout, rows_per_request: int, cfg: EditConfig, chunk: int = 64,
                   tokens: int = 16) -> int:
    """Requests per batch of the value fit: at most ``chunk``, and few enough that the batch's
    autograd activations stay within ``edit.fit_memory_gib``, estimated at n_layers x (16 x
    d_model + 4 x d_ff) floats per token for ``tokens`` tokens a row (about twice what was
    measured on SmolLM2-135M: 64 requests x 21 rows took 22 GiB)."""
    c = adapter.config
    d_ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * adapter.d_model
    per_row = adapter.n_layers * (16 * adapter.d_model + 4 * int(d_ff)) * 4 * tokens  # bytes
    rows = int(cfg.fit_memory_gib * 2**30 // per_row)
    return max(1, min(chunk, rows // max(1, rows_per_request)))


@torch.enable_grad()
def fit_values(adapter: ModelLayout, tok, requests: list[EditRequest], prefixes: list[str],
               sites: ValueSites, cfg: EditConfig, chunk: int = 64, cache: FitCache | None = None,
               progress: bool = False) -> FittedValues:
    """Fit the deltas of ``requests`` (at most ``chunk`` requests per batch, fewer where the
    batch would exceed ``edit.fit_memory_gib``: :func:`fit_chunk_size`). With ``cache`` (for
    the model as it is now) a chunk fitted before is read back, and each new one is saved as
    soon as it is fitted: a stopped fit resumes where it stopped. ``progress``: a bar over the
    requests, with an estimate, when there is more than one chunk (shown on a terminal)."""
    import sys

    from tqdm import tqdm

    chunk = fit_chunk_size(adapter, len(prefixes) + (cfg.kl_weight > 0), cfg, chunk)
    parts = []
    with tqdm(total=len(requests), desc=f"fitting new values at L{sites.mlp_layer}", unit="request",
              file=sys.stderr, disable=None if progress and len(requests) > chunk else True) as bar:
        for i in range(0, len(requests), chunk):
            parts.append(_cached_chunk(adapter, tok, requests[i : i + chunk], prefixes, sites, cfg, cache))
            bar.update(len(parts[-1].nll))

    def cat(xs: list) -> torch.Tensor | None:
        return None if xs[0] is None else torch.cat(xs, 0)

    return FittedValues(cat([p.mlp for p in parts]), cat([p.heads for p in parts]),
                        sum((p.nll for p in parts), []), sum((p.base_nll for p in parts), []))


class _LastTokenRun:
    """Each row's last token only, on the cached keys and values of the tokens before it.

    An edit made at the prompt's last position, scored at that position only, leaves every
    earlier position unchanged (causal attention), so those are computed once (no gradient)
    and each fitting step runs one token per row: about T times cheaper."""

    def __init__(self, adapter: ModelLayout, rows: list[Row], pad: int, device):
        from factedit.analysis.rerun import last_logits_only, layer_kv, new_cache, output_cache, with_cache

        n = [len(r.ids) for r in rows]
        # the earlier tokens right-padded (a left pad would attend to nothing and could turn to
        # NaN); the last token then follows the padding, which its attention mask hides
        prefix, mask = pad_right([r.ids[:-1] for r in rows], pad, device)  # (B, T-1)
        model = self.model = adapter.model
        self.adapter = adapter
        self.mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (B, T)
        self.pos = torch.tensor([[k - 1] for k in n], device=device)  # (B, 1): its position without padding
        self.last = torch.tensor([[r.ids[-1]] for r in rows], device=device)  # (B, 1)
        self.kw = last_logits_only(model)
        self.windows = {la: w for la in range(adapter.n_layers) if (w := adapter.attn_window(la)) is not None}
        with torch.no_grad(), padding_safe(adapter, mask):  # a cache of every position (the model's own
            # would cut sliding layers)
            out = model(input_ids=prefix, attention_mask=mask, use_cache=True, **with_cache(model, new_cache([])))
        self.kv = [layer_kv(output_cache(out), la) for la in range(adapter.n_layers)]
        self.window_masks = {la: self._window_mask(n, w, device) for la, w in self.windows.items()}

    def _window_mask(self, n: list[int], window: int, device) -> torch.Tensor:
        """(B, 1, 1, T) additive mask of a sliding layer. The last token's cache slot (T-1) is
        not its position (n-1) in padded rows, so the window is laid out in positions here,
        where the model's own mask would count cache slots."""
        T = self.mask.shape[1]
        slot = torch.arange(T, device=device)[None, :]  # (1, T): prefix slot j holds position j
        last = torch.tensor(n, device=device)[:, None] - 1  # (B, 1)
        ok = (slot < last) & (slot > last - window)  # the row's own earlier tokens within the window
        ok[:, -1] = True  # the token itself
        m = torch.zeros(ok.shape, dtype=torch.float32, device=device)
        m[~ok] = torch.finfo(torch.float32).min
        return m[:, None, None, :]

    def __call__(self) -> torch.Tensor:
        """(B, V) logits at each row's last token."""
        from factedit.analysis.hooks import attention_masks
        from factedit.analysis.rerun import new_cache, with_cache

        with attention_masks(self.adapter, self.window_masks.get):
            out = self.model(input_ids=self.last, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                             **with_cache(self.model, new_cache(self.kv)), **self.kw)
        return out.logits[:, -1]


class _SuffixRun:
    """Each row from its subject's last token on, on the cached keys and values of the tokens
    before it.

    Every delta is added at the subject's last token or later, so the tokens before it are the
    same in every fitting step: they run once (no gradient), and each step runs (and back-
    propagates through) the suffix only. Measured on SmolLM2-135M with ROME's 20 prefixes: about
    half of each row's tokens. The cached prefixes are right-padded to one length, their padding
    masked; each suffix token has its own position. Not used with sliding-window layers shorter
    than a row (their masks count cache slots, not positions)."""

    def __init__(self, adapter: ModelLayout, rows: list[Row], pad: int, device, scored: list[int] | None = None):
        from factedit.analysis.rerun import layer_kv, new_cache, output_cache, with_cache

        self.model, cut = adapter.model, [r.s_last for r in rows]
        # logits only at the suffix positions some row is scored (or KL-compared) at, where the
        # model's forward can leave the others out (the unembedding of every suffix token is,
        # by a count of the products, about a fifth of a fitting step on SmolLM2; not timed on
        # its own); ``slot`` maps a suffix position to its row of the returned logits
        keep = sorted(set(scored)) if scored is not None else None
        if keep is not None and "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            self.kw = {"logits_to_keep": torch.tensor(keep, device=device)}
            self.slot = {p: i for i, p in enumerate(keep)}
        else:
            self.kw, self.slot = {}, None
        prefix, pmask = pad_right([r.ids[:c] for r, c in zip(rows, cut)], pad, device)  # (B, P)
        self.ids, smask = pad_right([r.ids[c:] for r, c in zip(rows, cut)], pad, device)  # (B, S)
        self.mask = torch.cat([pmask, smask], 1)  # (B, P + S)
        self.pos = torch.tensor(cut, device=device)[:, None] + torch.arange(self.ids.shape[1], device=device)
        with torch.no_grad():  # a cache of every position (the model's own would cut sliding layers)
            out = self.model(input_ids=prefix, attention_mask=pmask, use_cache=True,
                             **with_cache(self.model, new_cache([])))
        # padded slots are masked below; zeroed, so that a row with no prefix at all (its
        # subject's last token first: no slot to attend to) cannot bring a non-finite value
        keep = pmask.bool()[:, None, :, None]  # (B, 1, P, 1)
        self.kv = [tuple(x.masked_fill(~keep, 0) for x in layer_kv(output_cache(out), la))
                   for la in range(adapter.n_layers)]
        self._cache = lambda: with_cache(self.model, new_cache(self.kv))

    @staticmethod
    def usable(adapter: ModelLayout, rows: list[Row]) -> bool:
        windows = [w for la in range(adapter.n_layers) if (w := adapter.attn_window(la)) is not None]
        longest = max(len(r.ids) for r in rows)
        return max(r.s_last for r in rows) >= 1 and (not windows or longest <= min(windows))

    def __call__(self) -> torch.Tensor:
        """(B, S, V) logits of the suffix tokens (S: the scored ones only, see ``slot``)."""
        return self.model(input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                          **self._cache(), **self.kw).logits

    def logit_rows(self, rows: list[Row]) -> list[Row]:
        """``rows`` (in suffix positions) with their scored and last positions as rows of the
        returned logits."""
        if self.slot is None:
            return rows
        return [dataclasses.replace(r, last=self.slot.get(r.last, r.last),
                                    targets=[(self.slot[p], t) for p, t in r.targets]) for r in rows]


def last_token_only(rows: list[Row], sites: ValueSites) -> bool:
    """Whether the fit can run on the last tokens alone: an MLP site at the last position, no
    head sites, every row scored (or KL-compared) at its last token only."""
    return (sites.mlp_position == "last" and not sites.heads and sites.mlp_layer is not None
            and min(len(r.ids) for r in rows) >= 2
            and all(r.last == len(r.ids) - 1 and all(p == r.last for p, _ in r.targets) for r in rows))


def _cached_chunk(adapter, tok, requests, prefixes, sites: ValueSites, cfg: EditConfig,
                  cache: FitCache | None) -> FittedValues:
    if cache is None:
        return _fit_chunk(adapter, tok, requests, prefixes, sites, cfg)
    p = next(adapter.model.parameters())
    key = cache.key(requests, prefixes, sites, cfg, p.dtype, p.device)
    fitted = cache.load(key, p.device)
    if fitted is None:
        fitted = _fit_chunk(adapter, tok, requests, prefixes, sites, cfg)
        cache.save(key, fitted)
    return fitted


def _pick_run(adapter: ModelLayout, rows: list[Row], sites: ValueSites, pad: int, device):
    """(hook rows, forward, suffix run or None): the cheapest forward pass the fit can take. The
    last tokens alone; else the suffix from the subject's last token on, over a cached prefix;
    else the full prompts, right-padded. The hook rows are ``rows`` in that run's positions."""
    model = adapter.model
    if last_token_only(rows, sites):
        run = _LastTokenRun(adapter, rows, pad, device)
        hook_rows = [dataclasses.replace(r, last=0, s_last=0, s_first=0) for r in rows]  # one-token run positions

        def forward() -> torch.Tensor:
            return run()[:, None]  # (B, 1, V): the last token sits at position 0
        return hook_rows, forward, None
    if _SuffixRun.usable(adapter, rows) and not any(o < 0 for o in sites.head_offsets):
        # positions in the suffix run: the subject's last token is its first token
        hook_rows = [dataclasses.replace(r, s_last=0, s_first=0, last=r.last - r.s_last,
                                         targets=[(p - r.s_last, t) for p, t in r.targets]) for r in rows]
        scored = [p for h in hook_rows for p, _ in h.targets] + [h.last for h, r in zip(hook_rows, rows) if r.kl]
        suffix = _SuffixRun(adapter, rows, pad, device, scored)
        return hook_rows, suffix, suffix
    ids, mask = pad_right([r.ids for r in rows], pad, device)

    def forward() -> torch.Tensor:
        with padding_safe(adapter, mask):
            return model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    return rows, forward, None


def _free_deltas(adapter: ModelLayout, sites: ValueSites, cur: dict, req_of: torch.Tensor, n: int, device):
    """(dm, dh, v_norm_mlp, v_norm_h): the zero deltas to fit, (n, d_model) at the MLP site and
    (n, J, head_dim) at the J head sites (None where there is no such site), and the norms of the
    current values there, per request (the mean over its rows)."""
    def mean_over(idx, vals):  # per-request mean of per-row values
        return torch.zeros(n, device=device, dtype=vals.dtype).index_add_(0, idx, vals)

    nrows = torch.zeros(n, device=device).index_add_(0, req_of, torch.ones(len(req_of), device=device))
    dm = dh = v_norm_mlp = v_norm_h = None
    if sites.mlp_layer is not None:
        v_norm_mlp = mean_over(req_of, cur["mlp"].float().norm(dim=-1)) / nrows  # (n,)
        dm = torch.zeros(n, adapter.d_model, device=device, requires_grad=True)
    if sites.heads:
        v_norm_h = torch.stack([mean_over(req_of, cur[f"v{j}"].float().norm(dim=-1)) / nrows
                                for j in range(len(sites.heads))], 1)  # (n, J)
        dh = torch.zeros(n, len(sites.heads), adapter.head_dim, device=device, requires_grad=True)
    return dm, dh, v_norm_mlp, v_norm_h


def _fit_chunk(adapter, tok, requests, prefixes, sites: ValueSites, cfg: EditConfig) -> FittedValues:
    model = adapter.model
    device = next(model.parameters()).device
    rows = build_rows(tok, requests, prefixes, cfg.kl_prompt if cfg.kl_weight > 0 else None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    n = len(requests)
    hook_rows, forward, suffix = _pick_run(adapter, rows, sites, pad, device)
    with torch.no_grad():
        cur, base_logits = _current(adapter, sites, hook_rows, forward)
    req_of = torch.tensor([r.req for r in rows], device=device)
    kl_rows = [b for b, r in enumerate(rows) if r.kl]
    # each target (and KL row's last token) at its position in the run's logits: the hook rows'
    # positions, or the suffix run's logit rows
    score_rows = suffix.logit_rows(hook_rows) if suffix is not None else hook_rows
    kl_last = torch.tensor([h.last for b, h in enumerate(score_rows) if rows[b].kl], device=device)
    base_kl = base_logits[kl_rows, kl_last].float().log_softmax(-1) if kl_rows else None
    targets = ScoredTargets.build(
        ((b, pos - r.last + h.last, t, r.req) for b, (r, h) in enumerate(zip(rows, hook_rows)) for pos, t in r.targets)
        if suffix is None else
        ((b, pos, t, r.req) for b, (r, h) in enumerate(zip(rows, score_rows)) for pos, t in h.targets), n, device)
    dm, dh, v_norm_mlp, v_norm_h = _free_deltas(adapter, sites, cur, req_of, n, device)
    opt = torch.optim.Adam([d for d in (dm, dh) if d is not None], lr=cfg.lr)
    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    base_nll = None
    try:
        for _step in range(cfg.steps + 1):
            with add_at_subject(adapter, sites, hook_rows, dm, dh):
                logits = forward()
            nll = targets.mean_nll(logits)  # (n,)
            if base_nll is None:
                base_nll = nll.detach().clone()
            if _step == cfg.steps or bool((nll < cfg.stop_nll).all()):
                break
            loss = nll.sum()
            if kl_rows:
                new = logits[kl_rows, kl_last].float().log_softmax(-1)
                kl = (base_kl.exp() * (base_kl - new)).sum(-1)  # (n_kl,)
                loss = loss + cfg.kl_weight * kl.sum()
            if dm is not None:
                loss = loss + cfg.weight_decay * (dm.pow(2).sum(-1) / v_norm_mlp.pow(2).clamp_min(1e-12)).sum()
            if dh is not None:
                loss = loss + cfg.weight_decay * (dh.pow(2).sum(-1) / v_norm_h.pow(2).clamp_min(1e-12)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if dm is not None:
                    _clamp(dm, cfg.clamp * v_norm_mlp)
                if dh is not None:
                    _clamp(dh, cfg.clamp * v_norm_h)
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    return FittedValues(None if dm is None else dm.detach(), None if dh is None else dh.detach(),
                        nll.detach().tolist(), base_nll.tolist())


def _clamp(delta: torch.Tensor, max_norm: torch.Tensor) -> None:
    norm = delta.norm(dim=-1)
    scale = (max_norm / norm.clamp_min(1e-12)).clamp(max=1.0)
    delta.mul_(scale[..., None])
