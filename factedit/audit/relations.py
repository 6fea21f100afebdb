"""Relations in words: the English labels of the Wikidata properties that ROME's known facts
(``factedit/data/known_1000.json``, field ``relation_id``) and CounterFact use.

Reports show a relation as its id and its label ("P17 country"), so a reader need not look the
id up. A relation that is already a word (the demo world's ``birthplace``, the places pool's
``city_country``) is shown as it is; a record without a relation as ``NO_RELATION``.
"""

from __future__ import annotations

# Wikidata's English label of each property (https://www.wikidata.org/wiki/Property:P17, ...).
WIKIDATA_RELATIONS: dict[str, str] = {
    "P17": "country",
    "P19": "place of birth",
    "P20": "place of death",
    "P27": "country of citizenship",
    "P30": "continent",
    "P36": "capital",
    "P37": "official language",
    "P39": "position held",
    "P101": "field of work",
    "P103": "native language",
    "P106": "occupation",
    "P108": "employer",
    "P127": "owned by",
    "P131": "located in the administrative territorial entity",
    "P136": "genre",
    "P138": "named after",
    "P140": "religion or worldview",
    "P159": "headquarters location",
    "P176": "manufacturer",
    "P178": "developer",
    "P190": "twinned administrative body",
    "P264": "record label",  # CounterFact only
    "P276": "location",
    "P364": "original language of film or TV show",
    "P407": "language of work or name",
    "P413": "position played on team / speciality",
    "P449": "original broadcaster",
    "P463": "member of",
    "P495": "country of origin",
    "P641": "sport",
    "P740": "location of formation",
    "P937": "work location",
    "P1303": "instrument",
    "P1412": "languages spoken, written or signed",
}

NO_RELATION = "(no relation given)"


def relation_name(relation: str) -> str:
    """``"P17"`` -> ``"P17 country"``; a relation without a known label unchanged; ``""`` (a
    record without ``relation_id``) -> ``NO_RELATION``."""
    if not relation:
        return NO_RELATION
    label = WIKIDATA_RELATIONS.get(relation)
    return f"{relation} {label}" if label else relation
