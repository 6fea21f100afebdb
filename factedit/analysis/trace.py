"""Causal tracing (Meng et al. 2022, ROME): where does restoring one state bring the fact back?

Corrupt the subject: add Gaussian noise to the token embeddings of the subject positions
(``noise``: its standard deviation, by default 3x the embeddings' standard deviation, as ROME
took over its subjects). Then, for each layer and traced position, restore one clean state
in the corrupted run and read p(token) at the output. Three kinds of state:

- ``hidden``: the residual stream after block l (one layer per row);
- ``mlp`` / ``attn``: what the MLP (or MHSA) sublayer adds to the residual, over the window
  of layers around l (``window_layers(l, window, L)``, the same windows as the knockouts;
  ROME restored 10 layers of GPT-2 XL's 48). With a post-sublayer norm (Gemma) it is the
  norm's output, what the residual receives.

The indirect effect of a state is p(token | corrupted, that state restored) - p(token |
corrupted), averaged over the noise samples (the same samples for every row); the total
effect is p(clean) - p(corrupted). ROME chose its edit layer where the MLP's indirect effect
at the last subject token peaks; factedit's circuit method does the same per fact (see
``editing.plan.plan_for``).

All rows run as batches of full forward passes with hooks (no rerun shortcut): a row costs
one pass of the prompt, and a trace costs ``samples x (1 + layers x positions)`` rows.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from factedit.analysis.hooks import Hooks, as_btd, first_output, upcast, with_output
from factedit.analysis.knockout import window_layers
from factedit.analysis.rerun import last_logits_only
from factedit.analysis.spans import TokenizedPrompt
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout

KINDS = ("hidden", "mlp", "attn")


@dataclass
class TraceResult:
    kind: str  # hidden | mlp | attn
    window: int  # layers restored per row (1 for hidden)
    noise: float  # standard deviation of the noise added to the subject's embeddings
    samples: int
    seed: int
    token: int  # the token whose probability is read
    p_clean: float
    p_corrupt: float  # mean over the samples
    positions: list[int]  # the traced token positions
    effect: list[list[float]]  # (L, len(positions)): indirect effect, in probability

    @property
    def total_effect(self) -> float:
        return self.p_clean - self.p_corrupt

    def best_layer(self, position: int, layers: list[int] | None = None) -> int:
        """The centre layer (among ``layers``, default all) with the largest indirect effect at
        ``position``."""
        if position not in self.positions:
            raise FactEditError(f"position {position} was not traced (traced: {self.positions})")
        i = self.positions.index(position)
        cands = layers if layers else range(len(self.effect))
        return max(cands, key=lambda la: self.effect[la][i])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TraceResult:
        return cls(**d)


@torch.no_grad()
def embedding_noise(adapter: ModelLayout, tok=None, n_tokens: int = 4096, seed: int = 0) -> float:
    """3x the standard deviation of the input embeddings (the embedding module's output, so
    Gemma's scaling is included) over ``n_tokens`` vocabulary tokens drawn without replacement
    (ROME took it over the subjects' tokens of its dataset; see ``noise_from_subjects``)."""
    emb = adapter.model.get_input_embeddings()
    n_vocab = emb.weight.shape[0]
    special = set(getattr(tok, "all_special_ids", []) or [])
    g = torch.Generator().manual_seed(seed)
    ids = [int(i) for i in torch.randperm(n_vocab, generator=g)[: n_tokens + len(special)] if int(i) not in special]
    x = emb(torch.tensor(ids[:n_tokens], device=emb.weight.device))
    return 3.0 * float(upcast(x).std())


@torch.no_grad()
def noise_from_subjects(adapter: ModelLayout, tok, subjects: list[str]) -> float:
    """ROME's noise level: 3x the standard deviation of the subjects' token embeddings."""
    emb = adapter.model.get_input_embeddings()
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise FactEditError("no subject tokens to measure the noise level on")
    return 3.0 * float(upcast(emb(torch.tensor(ids, device=emb.weight.device))).std())


def _site_module(adapter: ModelLayout, kind: str, layer: int) -> torch.nn.Module:
    return adapter.block(layer) if kind == "hidden" else adapter.to_residual(kind, layer)


@torch.no_grad()
def causal_trace(adapter: ModelLayout, tp: TokenizedPrompt, token: int, kind: str = "mlp", *,
                 positions: list[int] | None = None, window: int = 10, samples: int = 10,
                 noise: float | None = None, seed: int = 0, max_rows: int = 256, bar=None) -> TraceResult:
    """Trace ``kind`` ("hidden", "mlp" or "attn") at ``positions`` (default: every position)
    for p(``token``) at the last position of ``tp``. ``bar`` (a tqdm bar, or None) hears each
    batch's rows (``trace_rows`` of them in all)."""
    if kind not in KINDS:
        raise FactEditError(f"trace kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if samples < 1:
        raise FactEditError(f"trace samples must be at least 1, got {samples}")
    model, L = adapter.model, adapter.n_layers
    T = len(tp.input_ids)
    positions = list(range(T)) if positions is None else sorted(set(positions))
    if not positions or not all(0 <= p < T for p in positions):
        raise FactEditError(f"trace positions must lie in 0..{T - 1}, got {positions}")
    k = 1 if kind == "hidden" else min(window, L)
    restore = {c: list(window_layers(c, k, L)) for c in range(L)}  # centre -> layers restored
    noise = embedding_noise(adapter) if noise is None else float(noise)
    device = next(model.parameters()).device
    ids = torch.tensor([tp.input_ids], device=device)
    s0, s1 = tp.subject_span

    # clean pass: p(token) and every state a row may restore
    clean: list[torch.Tensor] = [None] * L  # (T, d) per layer
    with Hooks() as hooks:
        for la in range(L):
            def keep(m, a, out, la=la):
                clean[la] = as_btd(first_output(out), 1)[0].clone()
            hooks.post(_site_module(adapter, kind, la), keep)
        p_clean = float(torch.softmax(upcast(model(input_ids=ids).logits[0, -1]), -1)[token])

    emb = model.get_input_embeddings()
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(samples, s1 - s0, emb.weight.shape[1], generator=g) * noise  # (S, n_subj, d)
    # row r of the full list: sample r % S, restoring job r // S - 1 (job -1: nothing restored)
    jobs = [(c, p) for c in range(L) for p in positions]
    n_rows = trace_rows(L, len(positions), samples)  # = samples * (1 + len(jobs))
    probs = torch.empty(n_rows, dtype=torch.float64)
    per = max(samples, (max_rows // samples) * samples)  # whole jobs per batch
    for start in range(0, n_rows, per):
        rows = range(start, min(n_rows, start + per))
        b = len(rows)
        batch_eps = torch.stack([eps[r % samples] for r in rows]).to(device)  # (b, n_subj, d)
        by_layer: dict[int, list[tuple[int, int]]] = {}  # layer -> (batch row, position)
        for i, r in enumerate(rows):
            j = r // samples - 1
            if j >= 0:
                c, p = jobs[j]
                for la in restore[c]:
                    by_layer.setdefault(la, []).append((i, p))

        def corrupt(m, a, out, batch_eps=batch_eps):
            out = out.clone()
            out[:, s0:s1] += batch_eps.to(out.dtype)
            return out

        with Hooks() as hooks:
            hooks.post(emb, corrupt)
            for la, where in by_layer.items():
                def put(m, a, out, la=la, where=where, b=b):
                    x = as_btd(first_output(out), b).clone()
                    for i, p in where:
                        x[i, p] = clean[la][p]
                    return with_output(out, x.view_as(first_output(out)))
                hooks.post(_site_module(adapter, kind, la), put)
            logits = model(input_ids=ids.expand(b, -1), **last_logits_only(model)).logits[:, -1]  # (b, V)
        probs[start: start + b] = torch.softmax(upcast(logits), -1)[:, token].double().cpu()
        if bar is not None:
            bar.update(b)

    by_job = probs.view(1 + len(jobs), samples).mean(1)  # (1 + jobs,)
    p_corrupt = float(by_job[0])
    eff = (by_job[1:] - p_corrupt).view(L, len(positions))
    return TraceResult(kind, k, noise, samples, seed, token, p_clean, p_corrupt, positions, eff.tolist())


def trace_rows(n_layers: int, n_positions: int, samples: int) -> int:
    """The forward-pass rows of one traced kind: ``samples x (1 + layers x positions)``."""
    return samples * (1 + n_layers * n_positions)


def trace(prompt: str, subject: str, target: str | None = None, *, model=None, tokenizer=None,
          kinds: tuple[str, ...] = KINDS, window: int = 10, samples: int = 10, noise: float | None = None,
          seed: int = 0, progress: bool = True) -> tuple[TokenizedPrompt, dict[str, TraceResult]]:
    """The full trace of a fact (every position, each of ``kinds``), following ``target``'s
    first token or the model's prediction. ``model``: loaded (with ``tokenizer``), a path, a
    named model, or None for the demo model. ``progress``: a bar with its estimate on stderr,
    shown on a terminal only (as the statistics text's sampling shows it); False: none."""
    from factedit.analysis.spans import target_token_ids, tokenize_with_subject
    from factedit.validate import bounded, check_model_args, check_prompt

    check_prompt(prompt, subject, target)  # the command line's checks, before any model work
    check_model_args(model, tokenizer, "trace")
    if not isinstance(kinds, (tuple, list)) or not kinds or any(k not in KINDS for k in kinds):
        raise FactEditError(f"trace: kinds must be some of {', '.join(KINDS)}, got {kinds!r}"[:300])
    bounded("window", window, "trace: window")
    bounded("samples", samples, "trace: samples")
    bounded("seed", seed, "trace: seed")
    if noise is not None:
        bounded("noise", noise, "trace: noise", integer=False)
    if model is None or isinstance(model, str) or hasattr(model, "__fspath__"):
        from factedit.models.loading import load_model

        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise FactEditError("trace: pass the tokenizer together with a loaded model")
    adapter = ModelLayout(model)
    tp = tokenize_with_subject(tokenizer, prompt, subject)
    if target is not None:
        token = target_token_ids(tokenizer, tp.prompt, target)[0]
    else:
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([tp.input_ids], device=model.device)).logits[0, -1].argmax())
    noise = embedding_noise(adapter, tokenizer) if noise is None else noise
    rows = len(kinds) * trace_rows(adapter.n_layers, len(tp.input_ids), samples)
    with tqdm(total=rows, desc=f"causal tracing ({', '.join(kinds)})", unit="pass", file=sys.stderr,
              disable=None if progress else True, dynamic_ncols=True) as bar:
        return tp, {k: causal_trace(adapter, tp, token, k, window=window, samples=samples, noise=noise, seed=seed,
                                    bar=bar) for k in kinds}
