"""`locate`: a fact's recall circuit, from attention knockout, vocabulary projection,
attribute rate and sublayer knockout.

Cost per fact: one clean forward pass (kept: it serves the projections and the reruns), then
the knockout sweeps as partial reruns (3L rows of the last position, 2L rows of the positions
from the subject on, each from its window's first layer up).
"""

from __future__ import annotations

from pathlib import Path

import torch

from factedit.analysis.attribute_rate import rate_of, related_tokens, top_kept
from factedit.analysis.circuit import EnrichmentMLP, ExtractionHead, LocateConfig, RecallCircuit
from factedit.analysis.heads import HeadScores, extraction_head_scores, head_scores, ov_rank, top_heads
from factedit.analysis.hooks import upcast
from factedit.analysis.knockout import attention_knockout
from factedit.analysis.projection import Components, components, rank_and_prob_of
from factedit.analysis.rerun import CleanRun, clean_run
from factedit.analysis.spans import PromptError, TokenizedPrompt, target_token_ids, tokenize_with_subject
from factedit.analysis.sublayer import SublayerKnockoutResult, sublayer_knockout
from factedit.analysis.trace import causal_trace, embedding_noise
from factedit.analysis.vocab import prunable
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout, context_length
from factedit.models.fingerprint import model_fingerprint


def check_length(model, tp: TokenizedPrompt) -> None:
    limit = context_length(model)
    if limit is not None and len(tp.input_ids) > limit:
        raise PromptError(
            f"the prompt is {len(tp.input_ids)} tokens long, more than the model's context of {limit}: "
            "shorten it"
        )


def world_related(model, tok, subject: str) -> set[int] | None:
    """For a model trained on a synthetic world: the subject's attributes' tokens."""
    from factedit.world.generate import World

    world = World.of(model)
    if world is None:
        return None
    try:
        ent = world.entity(subject)
    except KeyError:
        return None
    return related_tokens(tok, list(ent.facts.values()))


def config_for_model(model) -> LocateConfig:
    """The analysis section of the recipe that comes with the model (a world model's, or a named
    real model's shipped recipe), else defaults."""
    from factedit.recipes import from_dict, model_recipe_section

    section, where = model_recipe_section(model, "analysis")
    return from_dict(LocateConfig, section, where=where)


def attribute_rates_by_position(adapter: ModelLayout, tok, tp: TokenizedPrompt, comp: Components,
                                resid_last_logits: torch.Tensor, related: set[int], k: int,
                                final_norm: bool) -> dict[str, list[float]]:
    """Attribute rate per stream layer (L+1, embeddings first) at the first subject token, the
    last subject token and the last position, and averaged over the positions between the
    subject and the last token. Every position's stream goes through the unembedding once, in
    one batch; the last position's layers reuse ``resid_last_logits`` (L, V)."""
    L = adapter.n_layers
    stream = comp.stream()  # (L+1, T, d)
    later = list(range(tp.subject_span[1], tp.last))  # between the subject and the last token
    positions = list(dict.fromkeys([tp.subject_span[0], tp.last_subject, *later]))
    vecs = torch.cat([stream[:, positions].transpose(0, 1).reshape(-1, stream.shape[-1]), stream[:1, tp.last]])
    logits = upcast(adapter.logit_lens(vecs, final_norm))  # (P*(L+1) + 1, V)
    top = rate_of(top_kept(tok, torch.cat([logits, resid_last_logits]), k), related, k)
    at = {pos: top[i * (L + 1): (i + 1) * (L + 1)] for i, pos in enumerate(positions)}
    at[tp.last] = top[len(positions) * (L + 1):]  # embeddings, then the reused layers
    by_pos = {name: at[pos] for name, pos in (("first_subject", tp.subject_span[0]),
                                              ("last_subject", tp.last_subject), ("last", tp.last))}
    if later:
        by_pos["after_subject"] = [sum(col) / len(col) for col in zip(*(at[p] for p in later))]
    return by_pos


def _model_and_tokenizer(model, tokenizer, caller: str):
    """A loaded (model, tokenizer) from ``model``: loaded already, a path or a name, or None
    for the embedded demo model."""
    if model is None or isinstance(model, (str, Path)):
        from factedit.models.loading import load_model

        return load_model(model)
    if tokenizer is None:
        raise FactEditError(f"{caller}: pass the tokenizer together with a loaded model")
    return model, tokenizer


def related_ids(model, tok, subject: str,
                related: str | list[str] | set[int] | None) -> tuple[set[int] | None, str | None]:
    """The related-token set for the attribute rate, and where it came from: ``related`` as
    token ids or as text, else (for a world model) the subject's attributes, else none."""
    if related is None:
        ids = world_related(model, tok, subject)
        return ids, "world attributes" if ids is not None else None
    if isinstance(related, set):
        return set(related), "token ids"
    return related_tokens(tok, related), "user text"


def vocabulary_projection(adapter: ModelLayout, comp: Components, last: int, token: int,
                          final_norm: bool) -> tuple[dict[str, torch.Tensor], dict[str, list], dict[str, list[int]]]:
    """The residual, MHSA and MLP outputs of every layer at the last position, in one batch
    through the unembedding: their logits (``{"resid"|"attn"|"mlp": (L, V)}``, reused by the
    heads, the attribute rate and the sublayer knockout), the rank and probability of ``token``
    in each (``{"<kind>_rank"|"<kind>_prob": (L,)}``) and the layers where an MHSA or MLP output
    ranks it first (extraction events)."""
    L = adapter.n_layers
    vecs = torch.cat([comp.resid[:, last], comp.attn, comp.mlp])  # (3L, d)
    lens = dict(zip(("resid", "attn", "mlp"), upcast(adapter.logit_lens(vecs, final_norm)).split(L)))
    proj: dict[str, list] = {}
    for name, logits in lens.items():
        r, p = rank_and_prob_of(logits, token)
        proj[f"{name}_rank"] = r.tolist()
        proj[f"{name}_prob"] = p.tolist()
    events = {k: [la for la in range(L) if proj[f"{k}_rank"][la] == 1] for k in ("attn", "mlp")}
    return lens, proj, events


def rank_heads(adapter: ModelLayout, comp: Components, tp: TokenizedPrompt, token: int, cfg: LocateConfig,
               attn_logits: torch.Tensor, heads: str) -> tuple[HeadScores, list[ExtractionHead]]:
    """Every head's rank and probability of ``token`` at the last position (with ``heads=
    "extraction"``, only the heads that can be extraction heads, ruled out against
    ``attn_logits`` (L, V), the MHSA outputs' projection), and the extraction heads, the first
    ``cfg.ov_check_heads`` of them with the OV parameter check."""
    fn = cfg.final_norm
    if heads == "all" or not prunable(adapter):
        hs = head_scores(adapter, comp, token, fn)
    else:  # only the heads that can be extraction heads, ruled out against the top of these projections
        hs = extraction_head_scores(adapter, comp, token, fn, cfg.head_max_rank,
                                    torch.cat([attn_logits, upcast(comp.logits)[None]]))
    chosen = top_heads(hs, cfg.head_max_rank, cfg.max_heads)
    ov = ov_rank(adapter, comp, tp.last_subject, chosen[: cfg.ov_check_heads], token, fn)
    found = [ExtractionHead(la, h, float(hs.prob[la, h]), int(hs.rank[la, h]),
                            ov[i] if i < len(ov) else None) for i, (la, h) in enumerate(chosen)]
    return hs, found


def enrichment_mlps(sk: SublayerKnockoutResult, max_enrichment: int) -> tuple[str, list[EnrichmentMLP]]:
    """The enrichment MLPs, best first: the layers whose removal at the subject lowers the
    attribute rate most (without a related-token set: p(token) at the output), and that metric."""
    if sk.attribute_rate is not None:
        metric = f"drop of the attribute rate at stream layer {sk.read_layer}"
        scores = [sk.base_attribute_rate - r for r in sk.attribute_rate["mlp"]]  # (L,)
    else:
        metric = "relative drop of p(token) at the output"
        scores = [-c / 100.0 for c in sk.prob_change["mlp"]]  # (L,)
    order = sorted(range(len(scores)), key=lambda la: -scores[la])
    return metric, [EnrichmentMLP(la, float(scores[la])) for la in order[:max_enrichment] if scores[la] > 0]


def _check_arguments(prompt, subject, target, model, tokenizer, related, config, heads) -> None:
    """``locate``'s arguments, checked as the command line checks them, before any model work."""
    from factedit.validate import check_instance, check_model_args, check_prompt, check_text

    if heads not in ("all", "extraction"):
        raise FactEditError(f"locate: heads must be 'all' or 'extraction', not {heads!r}")
    check_prompt(prompt, subject, target)
    check_model_args(model, tokenizer, "locate")
    check_instance(config, LocateConfig, "locate: config", "a LocateConfig")
    if isinstance(related, str):
        check_text(related, "locate: related")
    elif isinstance(related, (list, set)):
        if not all(isinstance(x, str) for x in related) and not all(
                isinstance(x, int) and not isinstance(x, bool) for x in related):
            raise FactEditError("locate: related must be a text, a list of texts or a set of token ids")
        for x in related:
            if isinstance(x, str):
                check_text(x, "locate: related")
    elif related is not None:
        raise FactEditError(f"locate: related must be a text, a list of texts or a set of token ids, got "
                            f"{type(related).__name__}")


def _prompt_and_clean_run(adapter: ModelLayout, tok, prompt: str, subject: str,
                          clean: CleanRun | None) -> tuple[TokenizedPrompt, CleanRun]:
    """The tokenized prompt and its clean run (``clean`` where it is this prompt's): the one
    clean pass, which serves the projections and both knockout sweeps."""
    tp = tokenize_with_subject(tok, prompt, subject)
    check_length(adapter.model, tp)
    if clean is None or clean.input_ids != tp.input_ids:
        clean = clean_run(adapter, tp.input_ids)
    return tp, clean


def _subject_mlp_trace(adapter: ModelLayout, tok, tp: TokenizedPrompt, token: int, cfg: LocateConfig):
    """The causal trace of the MLPs at the last subject token (``cfg.trace``)."""
    return causal_trace(adapter, tp, token, "mlp", positions=[tp.last_subject], window=cfg.trace_window,
                        samples=cfg.trace_samples, noise=cfg.trace_noise or embedding_noise(adapter, tok))


@torch.no_grad()
def locate(prompt: str, subject: str, target: str | None = None, *, model=None, tokenizer=None,
           related: str | list[str] | set[int] | None = None, config: LocateConfig | None = None,
           fingerprint: str | None = None, clean: CleanRun | None = None,
           extraction: bool = True, heads: str = "all") -> RecallCircuit:
    """Locate the recall circuit of the fact ``prompt`` (a template with ``{}`` or a full
    prompt containing ``subject``).

    ``model`` is a loaded model (then ``tokenizer`` is required), a path, or None for the
    embedded demo model. ``target`` makes every extraction measure follow that token instead of
    the model's own prediction. ``related`` is the subject's related-token set for the
    attribute rate: a text, a list of strings, or token ids; for a world model it defaults to
    the subject's attributes. ``clean`` is the prompt's clean run when the caller already made
    it (the audit does, to check that the model knows the fact). ``extraction=False`` skips the
    sublayer knockout's extraction curves (left None; the audit does not keep them).
    ``heads="extraction"`` ranks only the heads that can be extraction heads (the others are
    ruled out exactly, without their full projection) and leaves ``head_rank``/``head_prob``
    None; the default ``"all"`` ranks every head.
    """
    _check_arguments(prompt, subject, target, model, tokenizer, related, config, heads)
    model, tok = _model_and_tokenizer(model, tokenizer, "locate")
    adapter = ModelLayout(model)
    if config is not None:
        config.validate()
    cfg = (config or config_for_model(model)).resolved(adapter.n_layers)
    fn = cfg.final_norm

    tp, clean = _prompt_and_clean_run(adapter, tok, prompt, subject, clean)
    comp = components(adapter, tp.input_ids, clean)
    probs = upcast(comp.logits).softmax(-1)  # (V,)
    pred = int(probs.argmax())
    token = target_token_ids(tok, tp.prompt, target)[0] if target is not None else pred  # the token followed

    ko = attention_knockout(adapter, tp, cfg.knockout_window, target=token if target is not None else None,
                            clean=clean, block_bos=cfg.knockout_bos)
    lens, proj, events = vocabulary_projection(adapter, comp, tp.last, token, fn)
    hs, found = rank_heads(adapter, comp, tp, token, cfg, lens["attn"], heads)
    rel_ids, source = related_ids(model, tok, subject, related)
    by_pos = None
    if rel_ids is not None:
        by_pos = attribute_rates_by_position(adapter, tok, tp, comp, lens["resid"], rel_ids, cfg.attribute_top_k, fn)
    sk = sublayer_knockout(adapter, tok, tp, cfg.sublayer_window, token, rel_ids, cfg.read_layer,
                           cfg.attribute_top_k, fn, clean=clean, extraction=extraction, clean_attn_logits=lens["attn"])
    metric, enrich = enrichment_mlps(sk, cfg.max_enrichment)
    trace = _subject_mlp_trace(adapter, tok, tp, token, cfg) if cfg.trace else None

    s0, s1 = tp.subject_span
    return RecallCircuit(
        prompt=tp.prompt,
        subject=subject,
        subject_span=[s0, s1],
        tokens=[tok.decode([i]) for i in tp.input_ids],
        prediction=tok.decode([pred]),
        prediction_id=pred,
        prediction_prob=float(probs[pred]),
        target=None if target is None else tok.decode([token]),
        target_id=token,
        target_prob=float(probs[token]),
        model=str(getattr(model, "name_or_path", "")),
        model_fingerprint=fingerprint or model_fingerprint(model),
        n_layers=adapter.n_layers,
        n_heads=adapter.n_heads,
        config=cfg.__dict__.copy(),
        knockout=ko.curves,
        knockout_target=ko.target_curves,
        attribute_rate=None if by_pos is None else by_pos["last_subject"],
        attribute_rate_by_position=by_pos,
        related_source=source,
        projection=proj,
        extraction_events=events,
        head_rank=hs.rank.tolist() if heads == "all" else None,
        head_prob=hs.prob.tolist() if heads == "all" else None,
        subject_attention=(None if comp.attn_pattern is None else
                           comp.attn_pattern[:, :, s0:s1].sum(-1).tolist()),  # (L, H)
        sublayer_knockout=sk,
        enrichment_metric=metric,
        enrichment_mlps=enrich,
        extraction_heads=found,
        trace=trace,
    )
