"""The paper's study (Geva et al. 2023, "Dissecting Recall of Factual Associations") on one
model and dataset, with the two extensions of the review it grew from.

``run_study`` locates the recall circuit of every known fact (``factedit.analysis.locate``,
one clean pass per prompt reused by every sweep) and aggregates:

1. information flow: attention-knockout curves with 95% bands, the first layer where each
   mean curve falls below -20% and -50%, and per fact whether relation (non-subject) edges
   matter before subject edges;
2. subject enrichment: the attribute rate by layer and position, through the logit lens and
   the raw unembedding, beside a control (another subject's related tokens);
3. attribute extraction: MHSA and MLP extraction events by layer (both projections), the share
   of facts with an extraction head, the heads' OV check, and the attribute's rank in the
   subject representation just before the first MHSA extraction event;
4. early against upper MLPs: the MLP updates at the subject positions removed in the first
   window against the last window below the read layer (``analysis.sublayer_window`` layers);
5. paraphrase stability: the relation's other templates of the dataset filled with the
   subject; Jaccard overlap of extraction heads, shift of the subject-knockout window and of
   the enrichment layers; per relation, stable and wording-dependent heads; the audit's
   ``robustness`` aggregate over the same records;
6. two-hop flow: composed queries over a country bridge (capital, continent, language of the
   country where / of which the subject ...), kept where the model answers both hops and the
   composed query; whether the bridge shows up before the answer.

The related-token text for the attribute rate (the paper used Wikipedia paragraphs, never
released): a user JSON file {subject: text}; for a world model, the subject's attributes in
the world; otherwise, by default, a short article the model itself writes about the subject
(greedy, from "Here is a short article about {subject}.", ``description_tokens`` tokens, 64),
without the subject's own name tokens. See ``describe_subjects``.

The study's parts, one module per finding: ``paper_record`` (one fact's measures),
``paper_flow`` (items 1 and 6), ``paper_enrichment`` (items 2 and 4), ``paper_extraction``
(items 3 and 5) and ``paper_report`` (the table, figures and files). Their public names are
importable from here too.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from factedit.analysis.circuit import LocateConfig
from factedit.audit.dataset import AuditFact, relation_templates
from factedit.errors import FactEditError
from factedit.models.adapter import ModelLayout
from factedit.models.fingerprint import model_fingerprint
from factedit.studies.paper_enrichment import (
    DESCRIBE_PROMPT,
    describe_subjects,
    early_mlp_summary,
    enrichment_summary,
    related_set,
)
from factedit.studies.paper_extraction import extraction_summary, jaccard, pair_measures, paraphrase_summary
from factedit.studies.paper_flow import (
    BRIDGES,
    SECOND_HOPS,
    THRESHOLDS,
    first_below,
    flow_summary,
    relation_first,
    two_hop,
)
from factedit.studies.paper_record import POSITIONS, SOURCES, argmax, fact_record, known_prompt, primary_facts
from factedit.studies.paper_report import FIGURES, PAPER, format_table, table_rows, write_study

__all__ = [
    "BRIDGES", "DESCRIBE_PROMPT", "FIGURES", "FORMAT", "PAPER", "POSITIONS", "SECOND_HOPS", "SOURCES", "THRESHOLDS",
    "Study", "StudyError", "StudyOptions", "argmax", "describe_subjects", "early_mlp_summary", "enrichment_summary",
    "extraction_summary", "fact_record", "first_below", "flow_summary", "format_table", "jaccard", "known_prompt",
    "load_related_file", "pair_measures", "paraphrase_summary", "primary_facts", "related_set", "relation_first",
    "run_study", "table_rows", "two_hop", "write_study",
]

FORMAT = "factedit.study/1"


class StudyError(FactEditError):
    pass


@dataclass
class StudyOptions:
    related: str = "auto"  # "auto" (world attributes, else "model"), "model", "dataset", or a JSON file path
    paraphrases: int = 2  # paraphrase prompts located per known fact (0: skip item 5)
    two_hop: bool = True
    max_chains: int = 40  # composed queries located at most
    description_tokens: int = 64
    describe_batch: int = 16
    seed: int = 0


@dataclass
class Study:
    """What ``run_study`` returns: the aggregates (``summary``) and per-fact records."""

    summary: dict
    records: list[dict] = field(default_factory=list)
    paraphrases: list[dict] = field(default_factory=list)
    chains: list[dict] = field(default_factory=list)


# ---- the study ---------------------------------------------------------------------------------

def load_related_file(path: str | Path) -> dict[str, str]:
    from factedit.io import read_json

    data = read_json(path, "--related file")
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, (str, list))
                                             for k, v in data.items()):
        raise StudyError(f"--related {path} must be a JSON object {{subject: text}}")
    return data


def progress_bar(total: int, desc: str, progress: bool, unit: str = "fact") -> tqdm:
    """A bar with its estimate on stderr, shown on a terminal only (``progress`` False: never)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None if progress else True,
                dynamic_ncols=True)


def tqdm_iter(items: list, desc: str, progress: bool, unit: str = "fact"):
    """``items`` under a ``progress_bar``."""
    with progress_bar(len(items), desc, progress, unit) as bar:
        for x in items:
            yield x
            bar.update(1)


def related_texts(opt: StudyOptions, facts: list[AuditFact], subjects: list[str], model, tok,
                  world, progress: bool = False) -> tuple[str, dict[str, str | list[str]]]:
    """(source, {subject: text}): the related-token text of each subject, from ``opt.related``
    ("auto" is the world's attributes for a world model, else the model's own descriptions)."""
    source = opt.related
    if source == "auto":
        source = "world" if world is not None else "model"
    texts: dict[str, str | list[str]] = {}
    if source == "world":
        if world is None:
            raise StudyError("--related world needs a world model")
        for s in subjects:
            try:
                texts[s] = list(world.entity(s).facts.values())
            except KeyError:
                pass
    elif source == "model":
        with progress_bar(len(set(subjects)), "describing subjects", progress, unit="subject") as bar:
            texts = dict(describe_subjects(model, tok, subjects, opt.description_tokens, opt.describe_batch, bar=bar))
    elif source == "dataset":
        by_subject: dict[str, list[str]] = defaultdict(list)
        for f in facts:
            by_subject[f.subject].append(f.attribute)
        texts = {s: by_subject[s] for s in subjects}
    else:
        given = load_related_file(source)
        texts = {s: given[s] for s in subjects if s in given}
        source = f"file:{source}"
    return source, texts


def _fact_records(adapter: ModelLayout, model, tok, kept: list, subjects: list[str], rel_sets: dict,
                  cfg: LocateConfig, fp: str, log: Callable[[str], None], progress: bool = False) -> list[dict]:
    """Items 1-4: one record per known fact, with the next subject's related tokens as its control.
    ``log`` hears the count every 25 facts where no bar is shown."""
    records = []
    with progress_bar(len(kept), "locating known facts", progress) as bar:
        for i, (f, tp, clean) in enumerate(kept):
            rel = rel_sets.get(f.subject)
            other = subjects[(subjects.index(f.subject) + 1) % len(subjects)] if len(subjects) > 1 else None
            control = rel_sets.get(other) if other is not None else None
            records.append(fact_record(adapter, model, tok, tp, clean, f, cfg, fp, rel, control))
            bar.update(1)
            if (i + 1) % 25 == 0 and bar.disable:
                log(f"located {i + 1}/{len(kept)}")
    return records


def _paraphrase_records(adapter: ModelLayout, model, tok, records: list[dict], kept: list, templates: dict,
                        rel_sets: dict, cfg: LocateConfig, fp: str, per_fact: int,
                        progress: bool = False) -> tuple[list[dict], list[dict]]:
    """Item 5: (pairs, paraphrase records), up to ``per_fact`` known paraphrases of each fact,
    from its relation's other templates."""
    pairs, para_records = [], []
    for rec, (f, _tp, _c) in tqdm_iter(list(zip(records, kept)), "locating paraphrases", progress):
        n = 0
        for tmpl in templates.get(f.relation, []):
            if n >= per_fact:
                break
            if tmpl == rec["template"]:
                continue
            got = known_prompt(adapter, tok, tmpl.replace("{}", f.subject, 1), f.subject, f.attribute)
            if got is None:
                continue
            pf = AuditFact(f.index, got[0].prompt, f.subject, f.attribute, f.relation, f.group, f.source_id)
            pr = fact_record(adapter, model, tok, got[0], got[1], pf, cfg, fp, rel_sets.get(f.subject), None)
            para_records.append(pr)
            pairs.append(pair_measures(rec, pr))
            n += 1
    return pairs, para_records


@torch.no_grad()
def run_study(facts: list[AuditFact], *, model, tokenizer, config: LocateConfig, limit: int | None = None,
              options: StudyOptions | None = None, world=None, dataset_name: str = "",
              out: str | Path | None = None, log: Callable[[str], None] = lambda m: None,
              progress: bool = True) -> Study:
    """The study of ``facts`` (the first ``limit`` subject-relation groups) on ``model``; writes
    ``study.json`` and the figures into ``out`` when given (checked by the caller). ``progress``:
    a bar per stage (facts checked, subjects described, facts and paraphrases located) with its
    estimate on stderr, shown on a terminal only; False: none."""
    opt = options or StudyOptions()
    tok = tokenizer
    adapter = ModelLayout(model)
    L = adapter.n_layers
    cfg = config.resolved(L)
    fp = model_fingerprint(model)
    times: dict[str, float] = {}
    t0 = time.perf_counter()

    primaries = primary_facts(facts, limit)
    templates = relation_templates(facts)
    kept = []
    for f in tqdm_iter(primaries, "checking which facts the model knows", progress):
        got = known_prompt(adapter, tok, f.prompt, f.subject, f.attribute)
        if got is not None:
            kept.append((f, *got))
    times["known_filter"] = time.perf_counter() - t0
    log(f"{len(kept)} of {len(primaries)} facts known")

    # related-token texts
    t = time.perf_counter()
    subjects = sorted({f.subject for f, _tp, _c in kept})
    source, texts = related_texts(opt, facts, subjects, model, tok, world, progress)
    rel_sets = {s: related_set(tok, v, s) for s, v in texts.items()}
    times["related_texts"] = time.perf_counter() - t

    # items 1-4
    t = time.perf_counter()
    records = _fact_records(adapter, model, tok, kept, subjects, rel_sets, cfg, fp, log, progress)
    times["locate"] = time.perf_counter() - t

    # item 5
    t = time.perf_counter()
    pairs, para_records = [], []
    if opt.paraphrases > 0:
        pairs, para_records = _paraphrase_records(adapter, model, tok, records, kept, templates, rel_sets, cfg, fp,
                                                  opt.paraphrases, progress)
    times["paraphrases"] = time.perf_counter() - t

    # item 6
    t = time.perf_counter()
    hops = two_hop(adapter, model, tok, records, facts, cfg, fp, opt.max_chains, log) if opt.two_hop else None
    times["two_hop"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0

    summary = {
        "format": FORMAT, "model": str(getattr(model, "name_or_path", "")), "model_fingerprint": fp,
        "dataset": dataset_name, "n_layers": L, "n_heads": adapter.n_heads, "config": cfg.__dict__.copy(),
        "facts_scanned": len(primaries), "facts_known": len(kept), "related_source": source,
        "related_facts": sum(bool(rel_sets.get(f.subject)) for f, _tp, _c in kept),
        "projection": cfg.projection,
        "flow": flow_summary(records, L) if records else None,
        "enrichment": enrichment_summary(records),
        "extraction": extraction_summary(records, L) if records else None,
        "early_mlp": early_mlp_summary(records, L),
        "paraphrase": paraphrase_summary(pairs, records, para_records) if opt.paraphrases > 0 else None,
        "two_hop": None if hops is None else {k: v for k, v in hops.items() if k != "chains"},
        "seconds": {k: round(v, 2) for k, v in times.items()},
    }
    summary["table"] = table_rows(summary)
    study = Study(summary, records, pairs, [] if hops is None else hops["chains"])
    if out is not None:
        write_study(Path(out), study, texts if source == "model" else None)
    return study
