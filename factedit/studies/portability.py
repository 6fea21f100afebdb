"""Portability probes: one-hop consequences of an edit (RippleEdits' logical generalisation,
MQuAKE's two-hop questions), built from the places pool's country facts.

An edit that moves a city (or region) from country A to country B should carry over to what
follows from the country: the continent the city is on, the official language and the
currency of the country it is in. For each such attribute X, a probe asks for X of the
subject through the edited link:

    continent  "{} is a city on the continent of"                 (city_continent's main prompt)
    language   "{} is a city in a country whose official language is"
    currency   "{} is a city in a country whose currency is the"

(regions: "region" for "city"). A probe is kept only where it can tell the two apart and
the model gets it right for the original fact: X(A) and X(B) have different first tokens,
and the unedited model's top-1 after the probe is X(A)'s first token. After the edit the
probe *ports* when the top-1 is X(B)'s first token (``ported``), and it *moved* when
p(X(B)) > p(X(A)) by mean token NLL (``moved``, the CounterFact-style comparison).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from factedit.studies.pool_base import PoolRequest, first_token, top1_tokens

TEMPLATES = {
    "continent": "{} is a {kind} on the continent of",
    "language": "{} is a {kind} in a country whose official language is",
    "currency": "{} is a {kind} in a country whose currency is the",
}
KINDS = {"city_country": "city", "region_country": "region"}  # edited relation -> subject kind


@dataclass(frozen=True)
class Probe:
    case_id: int | str | None  # the request it belongs to
    attribute: str  # continent | language | currency
    prompt: str
    old: str  # X(A): what the unedited model answers
    new: str  # X(B): what follows from the edit

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_probes(requests: Sequence[PoolRequest], countries: dict[str, dict[str, str]], tok) -> list[Probe]:
    """Every probe of the requests that edit a city's or a region's country, where both
    countries' attribute is known and the first tokens differ (no model needed)."""
    return [p for pr in requests for p in probes_of(pr.relation, pr.request.subject, pr.request.target_true,
                                                    pr.request.target_new, countries, tok, pr.request.case_id)]


def probes_of(relation: str, subject: str, true: str | None, new: str, countries: dict[str, dict[str, str]], tok,
              case_id: int | str | None = None) -> list[Probe]:
    """One edit's probes (no model needed): none unless ``relation`` is a city's or a region's
    country and both countries' attribute is known with different first tokens."""
    kind, a, b = KINDS.get(relation), countries.get(true or ""), countries.get(new)
    if kind is None or a is None or b is None:
        return []
    return [Probe(case_id, attr, template.format(subject, kind=kind), a[attr], b[attr])
            for attr, template in TEMPLATES.items()
            if a[attr] and b[attr] and first_token(tok, a[attr]) != first_token(tok, b[attr])]


def known_probes(model, tok, probes: Sequence[Probe]) -> list[Probe]:
    """The probes the unedited model answers with the original fact's attribute."""
    tops = top1_tokens(model, tok, [p.prompt for p in probes])
    return [p for p, t in zip(probes, tops) if t == first_token(tok, p.old)]


def score_probes(model, tok, probes: Sequence[Probe]) -> dict[str, list[bool]]:
    """After the edit: per probe, whether it ports (top-1 = X(B)'s first token) and whether it
    moved (X(B) beats X(A) by mean per-token NLL)."""
    from factedit.verify.metrics import compare

    tops = top1_tokens(model, tok, [p.prompt for p in probes])
    ported = [t == first_token(tok, p.new) for p, t in zip(probes, tops)]
    moved = []
    for p in probes:
        c = compare(model, tok, [p.prompt], p.new, p.old)
        moved.append(c["nll_new"][0] < c["nll_true"][0])
    return {"ported": ported, "moved": moved}
