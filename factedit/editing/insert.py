"""Writing fitted values into weights: keys, ROME's rank-one insertion and MEMIT's batch
least squares.

A projection W (out, in) maps a key k (in) to a value. To make W k* = W k* + delta while
moving every other key as little as possible (weighted by the keys' second moment C):

- one key (ROME):   ΔW = delta (C^-1 k*)^T / (k*^T C^-1 k*)            -> ΔW k* = delta exactly
- many keys (MEMIT): ΔW = R K^T (λ C + K K^T)^-1,  K (in, n), R (out, n)

For the MLP the key is the output projection's input at the subject's last token; for a
head's value projection it is the attention input (after the block's norm) there. Keys are
averaged over the context prefixes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from factedit.analysis.hooks import (
    Hooks,
    as_btd,
    attention_masks,
    causal_mask,
    first_input,
    first_output,
    pad_right,
    padding_safe,
)
from factedit.analysis.spans import tokenize_with_subject
from factedit.editing.requests import EditRequest
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout


@torch.no_grad()
def at_tokens(adapter: ModelLayout, tok, requests: list[EditRequest], prefixes: list[str],
              modules: dict[Hashable, torch.nn.Module], where: str = "in", chunk: int = 256,
              position: str | int = "subject", block_subject: list[int] | None = None,
              fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
              per_prefix: bool = False) -> dict[Hashable, torch.Tensor]:
    """{key: (n, width)}: each module's input (or output) at the subject's last token (or the
    last position, or another subject token: :func:`token_position`) of each request's prompt,
    averaged over the context prefixes (with
    ``per_prefix``: (n, n_prefixes, width), each context's own, in the order of ``prefixes``);
    every module read in the same forward passes. With ``block_subject`` (layers), the edges last position
    -> subject are blocked there, as in attention knockout. ``fn(x, req)`` maps the rows read
    (b, width) of requests ``req`` (b,) before they are averaged."""
    device = next(adapter.model.parameters()).device
    texts = [(i, f"{p} {r.filled_prompt}" if p else r.filled_prompt, r.subject)
             for i, r in enumerate(requests) for p in prefixes]
    sums: dict[Hashable, torch.Tensor] = {}
    reads: dict[Hashable, list[torch.Tensor]] = {}  # per_prefix: each chunk's (b, width)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for c0 in range(0, len(texts), chunk):
        part = texts[c0 : c0 + chunk]
        got = _read_chunk(adapter, [tokenize_with_subject(tok, t, s) for _, t, s in part], modules, where,
                          position, block_subject, pad, device)
        req = torch.tensor([i for i, _, _ in part], device=device)
        for key, x in got.items():
            if fn is not None:
                x = fn(x, req).float()
            if per_prefix:
                reads.setdefault(key, []).append(x)
                continue
            if key not in sums:
                sums[key] = torch.zeros(len(requests), x.shape[-1], device=x.device)
            sums[key].index_add_(0, req, x)
    if per_prefix:  # texts run request by request, prefix by prefix
        return {key: torch.cat(xs).reshape(len(requests), len(prefixes), -1) for key, xs in reads.items()}
    return {key: s / len(prefixes) for key, s in sums.items()}


def token_position(tp, position: str | int) -> int:
    """Where a key is read in a tokenised prompt: "subject" (its last token), "last" (the
    prompt's last token), or an offset (<= 0) from the subject's last token, kept within the
    subject."""
    if isinstance(position, int):
        return max(tp.subject_span[0], tp.last_subject + position)
    return tp.last_subject if position == "subject" else tp.last


def _read_chunk(adapter: ModelLayout, tps: list, modules: dict[Hashable, torch.nn.Module], where: str,
                position: str | int, block_subject: list[int] | None, pad: int, device) -> dict[Hashable, torch.Tensor]:
    """{key: (b, width)}: one padded batch's reads at each prompt's token (see :func:`at_tokens`)."""
    ids, mask = pad_right([tp.input_ids for tp in tps], pad, device)  # (b, T)
    nb, T = ids.shape
    rows = torch.arange(nb, device=device)
    pos = torch.tensor([token_position(tp, position) for tp in tps], device=device)
    masks = {}
    for la in block_subject or []:
        blocked = causal_mask(nb, T, torch.float32, device, adapter.attn_window(la))
        for b, tp in enumerate(tps):
            blocked[b, 0, tp.last, tp.subject_span[0] : tp.subject_span[1]] = torch.finfo(torch.float32).min
        masks[la] = blocked
    got: dict[Hashable, torch.Tensor] = {}

    def keep(key: Hashable, x: torch.Tensor) -> None:
        got[key] = as_btd(x, nb)[rows, pos].float()  # (b, width)
        if len(got) == len(modules):  # every module read: the layers above (and the unembedding) are not needed
            raise _AllRead

    with Hooks() as hooks, padding_safe(adapter, mask), attention_masks(adapter, masks.get):
        for key, module in modules.items():
            if where == "in":
                hooks.pre(module, lambda m, args, kwargs, key=key: keep(key, first_input(args, kwargs)))
            else:
                hooks.post(module, lambda m, args, out, key=key: keep(key, first_output(out)))
        try:
            adapter.model(input_ids=ids, attention_mask=mask)
        except _AllRead:
            pass
    return got


class _AllRead(Exception):
    """Ends a reading pass once every requested module has been read."""


def at_token(adapter: ModelLayout, tok, requests: list[EditRequest], prefixes: list[str],
             module: torch.nn.Module, where: str = "in", **kw) -> torch.Tensor:
    """(n, width): :func:`at_tokens` of one module."""
    return at_tokens(adapter, tok, requests, prefixes, {0: module}, where, **kw)[0]


def mean_keys(adapter: ModelLayout, tok, requests: list[EditRequest], prefixes: list[str], kind: str,
              layer: int, position: str | int = "subject", block_subject: list[int] | None = None,
              per_prefix: bool = False) -> torch.Tensor:
    """(n, n_in) keys: the MLP output projection's input ("mlp") or the attention input ("attn");
    with ``per_prefix`` (n, n_prefixes, n_in), each context's own."""
    module = adapter.mlp_out(layer) if kind == "mlp" else adapter.attn(layer)
    return at_token(adapter, tok, requests, prefixes, module, "in", position=position, block_subject=block_subject,
                    per_prefix=per_prefix)


def context_keys(adapter: ModelLayout, tok, request: EditRequest, prefixes: list[str], kind: str, layer: int,
                 position: str | int = "subject") -> torch.Tensor:
    """(n_prefixes, n_in): one request's key in each context (prefix), in the order of
    ``prefixes``; their mean is :func:`mean_keys`'s."""
    module = adapter.mlp_out(layer) if kind == "mlp" else adapter.attn(layer)
    return at_token(adapter, tok, [request], prefixes, module, "in", position=position, per_prefix=True)[0]


def mean_hidden(adapter: ModelLayout, tok, requests: list[EditRequest], prefixes: list[str], layer: int,
                position: str = "subject", per_prefix: bool = False) -> torch.Tensor:
    """(n, d) residual stream after block ``layer`` at the subject's last token (or the last);
    with ``per_prefix`` (n, n_prefixes, d)."""
    return at_token(adapter, tok, requests, prefixes, adapter.block(layer), "out", position=position,
                    per_prefix=per_prefix)


def mlp_to_residual(adapter: ModelLayout, tok, requests: list[EditRequest], prefixes: list[str], layer: int,
                    delta: torch.Tensor, position: str = "subject", per_prefix: bool = False) -> torch.Tensor:
    """(n, d): what the residual stream receives, averaged over the prefixes, when each
    request's MLP output at ``layer`` moves by ``delta`` (n, d). The same ``delta`` without a
    post-MLP norm; with one (Gemma 2/3), norm(m + delta) - norm(m) at each prompt's MLP output m."""
    norm = adapter.post_norm("mlp", layer)
    if norm is None:
        return delta[:, None].expand(-1, len(prefixes), -1) if per_prefix else delta

    def change(m: torch.Tensor, req: torch.Tensor) -> torch.Tensor:  # m (b, d) MLP outputs
        dt = norm.weight.dtype
        return norm((m + delta[req].to(m.device)).to(dt)).float() - norm(m.to(dt)).float()

    return at_token(adapter, tok, requests, prefixes, adapter.mlp(layer), "out", position=position, fn=change,
                    per_prefix=per_prefix)


def residual_to_mlp(adapter: ModelLayout, tok, requests: list[EditRequest], prefixes: list[str], layer: int,
                    resid: torch.Tensor, position: str = "subject") -> torch.Tensor:
    """(n, d): the MLP output change at ``layer`` that gives the residual change ``resid``
    (n, d); for ``resid`` (n, n_prefixes, d), each context's own. The same without a post-MLP
    norm. With an RMS post-norm (Gemma 2/3) the residual receives norm(m) = g * m / rms(m),
    which lies on the ellipsoid {g * v : rms(v) = 1} whatever m is: each prompt's change is
    :func:`through_rms_norm`'s, the MLP output whose normed value is the point of that set
    nearest norm(m) + resid, averaged over the prefixes (or each context's own). MEMIT's spread
    re-measures what is left after each layer."""
    if adapter.post_norm("mlp", layer) is None:
        return resid
    per_prefix = resid.dim() == 3
    flat = resid.flatten(0, 1) if per_prefix else resid  # (n m, d) in at_tokens' row order, or (n, d)
    read = [0]  # per_prefix: how many rows were read before this chunk, to index each context's own

    def change(m: torch.Tensor, req: torch.Tensor) -> torch.Tensor:  # m (b, d) MLP outputs of requests req (b,)
        idx = req
        if per_prefix:
            idx = torch.arange(read[0], read[0] + len(req), device=req.device)
            read[0] += len(req)
        gain = adapter.post_gain("mlp", layer, m).double()  # (b, d): g / rms(m), frozen at m
        m = m.double()
        g = gain * m.pow(2).mean(-1, keepdim=True).sqrt()  # (b, d) the norm's gain g (eps aside)
        return through_rms_norm(m, g, flat[idx.to(flat.device)].to(m)) - m

    return at_token(adapter, tok, requests, prefixes, adapter.mlp(layer), "out", position=position,
                    fn=change, per_prefix=per_prefix).to(resid)


def through_rms_norm(m: torch.Tensor, g: torch.Tensor, resid: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """(b, d) a new input m' of the RMS norm x -> g * x / rms(x) whose output is the point of the
    norm's output set {g * v : rms(v) = 1} nearest to norm(m) + resid, for inputs m (b, d),
    gains g (b, d) and wanted output changes resid (b, d).

    Nearest point: minimise |g v - t|^2 over |v|^2 = d, with t = g m / rms(m) + resid. Its
    Lagrange condition gives v_i = g_i t_i / (g_i^2 + mu), with the one mu > -min g^2 at which
    mean(v^2) = 1 (found by bisection: mean(v^2) falls as mu grows). A dimension with a gain
    near 0 gets a bounded v_i: the norm cannot move the output there, so it is not asked to,
    where dividing by the gain (a frozen-gain inverse) asks for a huge input there, which then
    raises rms(m') and shrinks every other dimension. The norm ignores the input's scale, so
    m' = s v with the s nearest m (s = v.m / d), kept at least a tenth of rms(m) so that the
    norm's eps stays negligible. Exact when the wanted output is reachable.

    With gains exactly 0 the reachable set is the filled ellipsoid in the other dimensions
    (the ignored ones absorb the rest of the length); its inside is met exactly too."""
    m, g = m.double(), g.double()
    rms = m.pow(2).mean(-1, keepdim=True).sqrt()  # (b, 1)
    t = g * m / rms + resid.double()  # (b, d) the wanted output
    gt = g * t
    g2 = g.pow(2)

    def v_at(mu: torch.Tensor) -> torch.Tensor:  # mu (b,) -> v (b, d); 0 where g t is 0 (also at mu = -g^2)
        den = g2 + mu[:, None]
        return torch.where(gt == 0, torch.zeros_like(gt), gt / torch.where(den == 0, torch.ones_like(den), den))

    lo = -g2.amin(-1)  # (b,) mean(v^2) -> inf as mu -> lo (where t is non-zero at the smallest gain)
    hi = lo + gt.pow(2).mean(-1).sqrt() + 1e-30  # g^2 + mu >= mu - lo there, so mean(v^2) <= 1
    for _ in range(iters):
        mid = (lo + hi) / 2
        big = v_at(mid).pow(2).mean(-1) > 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    v = v_at(hi)  # (b, d), rms 1 up to the bisection's width
    # the hard case: short of rms 1 even at mu = -min g^2. Then the dimensions of that smallest
    # gain where g t = 0 (a zero gain: the norm ignores them) take the rest of the length, along m
    free = (g2 == g2.amin(-1, keepdim=True)) & (gt == 0)  # (b, d)
    short = (v.shape[-1] - v.pow(2).sum(-1, keepdim=True)).clamp_min(0)  # (b, 1)
    along = torch.where(free, torch.where(m == 0, torch.ones_like(m), m), torch.zeros_like(m))
    hard = free.any(-1, keepdim=True) & (short > 1e-9 * v.shape[-1])
    v = v + torch.where(hard, along * (short / along.pow(2).sum(-1, keepdim=True).clamp_min(1e-300)).sqrt(), 0.0)
    v = v / v.pow(2).mean(-1, keepdim=True).sqrt()
    s = torch.maximum((v * m).mean(-1, keepdim=True), rms / 10)  # (b, 1)
    return s * v


class SingularSolveError(FactEditError):
    pass


def _solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve``; a singular system (too few statistics samples for the key space,
    and no ridge) is a one-line error naming the recipe values to change."""
    try:
        return torch.linalg.solve(A, B)
    except RuntimeError as exc:  # torch.linalg.LinAlgError
        raise SingularSolveError(
            "the key statistics are singular, so the update cannot be solved for: raise edit.insert.ridge above 0 "
            f"(e.g. 1e-4) or edit.stats.samples in the recipe ({str(exc).splitlines()[0][:120]})") from None


def regularised(C: torch.Tensor, ridge: float) -> torch.Tensor:
    """C + ridge * mean(diag C) * I, in float64 (well conditioned for the solves)."""
    C = C.double()
    return C + ridge * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


# a null-key constraint is dropped where it would cost more than this many times ROME's
# update (measured on the demo model: 1,000 sequential edits 54.9 -> 90.9% efficacy, single
# edits unchanged; see docs/results/demo-edits.md)
NULL_MAX_COST = 25.0


def rank_one(C: torch.Tensor, key: torch.Tensor, delta: torch.Tensor, ridge: float,
             null_keys: torch.Tensor | None = None, kept: tuple[torch.Tensor, float] | None = None,
             context_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ROME's insertion: factors (B (out, 1), A (1, in)) with (B A) key = delta. With
    ``context_keys`` (m, in), the keys of one fact in each of its contexts (``key`` is usually
    their mean): (B A) k_i = delta for every one of them instead, the C-smallest such update
    (u = C^-1 K (K^T C^-1 K)^+ 1, K = context_keys^T): each prompt the value was fitted on gets
    all of delta, where ROME's update gives context i only the share
    r_i = k^T C^-1 k_i / k^T C^-1 k (1 on average). With ``null_keys`` (m, in), also
    (B A) null_keys = 0: the C-smallest update that fires on the key(s) and not on those
    (u = C^-1 K (K^T C^-1 K)^-1 t, K = [keys, null_keys], t = [1.., 0..]). With ``kept`` =
    (K_p^T K_p (in, in), the Gram matrix of earlier edits' keys, λ), C becomes C + K_p^T K_p / λ:
    the update also moves the keys of earlier edits little (their weight against the corpus's
    keys is MEMIT's, as in ``least_squares``)."""
    Creg = regularised(C, ridge)
    if kept is not None:
        Creg = Creg + kept[0].to(Creg) / kept[1]
    hit = key.double()[None] if context_keys is None or not len(context_keys) else context_keys.double()
    if len(hit) == 1:  # ROME's
        Ci_k = _solve(Creg, hit[0])  # (in,)
        Ci_H = Ci_k[:, None]
        a = Ci_k / (hit[0] @ Ci_k)
        cost = 1 / float(hit[0] @ Ci_k)  # a^T C a
    else:
        # the C-smallest a with a . k_i = 1 for every context key; the keys of one fact in its
        # contexts are nearly collinear, so G is solved by pseudo-inverse (exact where the keys
        # allow it, else the least-squares fit)
        Ci_H = _solve(Creg, hit.T)  # (in, m)
        g_hit = _pinv(hit @ Ci_H) @ torch.ones(len(hit), dtype=hit.dtype, device=hit.device)
        a = Ci_H @ g_hit
        cost = float(g_hit.sum())
    if null_keys is not None and len(null_keys):
        K = torch.cat([hit, null_keys.double()], 0).T  # (in, m + m0)
        Ci_K = torch.cat([Ci_H, _solve(Creg, null_keys.double().T)], 1)
        G = K.T @ Ci_K
        # where a null key is (nearly) the key itself, both cannot hold: keep the update without
        # it. Likewise where holding them would cost over NULL_MAX_COST times that update (in
        # C's norm, a^T C a): such an update is large on every other key
        t = torch.zeros(K.shape[1], dtype=K.dtype, device=K.device)
        t[: len(hit)] = 1
        if len(hit) == 1:
            g = _solve(G, t) if torch.linalg.cond(G) < 1e8 else None
        else:  # several context keys: held where the pseudo-inverse meets every null key
            g = _pinv(G) @ t
            if float((G[len(hit):] @ g).abs().max()) > 1e-3:
                g = None
        if g is not None and float(t @ g) <= NULL_MAX_COST * cost:  # cost ratio (>= 1)
            a = Ci_K @ g
    return delta.double()[:, None].float(), a[None].float()


def _pinv(G: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD Gram matrix, small eigenvalues (below 1e-12 of the
    largest) dropped."""
    return torch.linalg.pinv(G, hermitian=True, rtol=1e-12)


def least_squares(C: torch.Tensor, keys: torch.Tensor, resid: torch.Tensor, lam: float, ridge: float,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's insertion for keys (n, in) and residuals (n, out): factors B = R^T (out, n),
    A = K (λ C + K^T K)^-1 (n, in)."""
    K = keys.double()
    M = lam * regularised(C, ridge) + K.T @ K  # (in, in)
    A = _solve(M, K.T).T  # (n, in), M symmetric
    return resid.double().T.float(), A.float()
