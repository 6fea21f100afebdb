"""The ``insertion`` pool: new knowledge about invented subjects (zsRE-like), no model needed.

Made-up names (people, companies, towns) built from syllables, each given one relation and an
attribute from a fixed list of real values, with paraphrase prompts. No knowledge filter: the
model has no prior fact to rewrite, so ``target_true`` is absent. Neighbourhood prompts are
the same relation asked about other invented subjects of the pool that no request edits (a
held-out set per relation): an insertion should not give them its attribute.

Deterministic from the seed; ``INSERTION_VERSION`` fixes the generator (a change bumps it).
"""

from __future__ import annotations

import random

from factedit.editing.requests import EditRequest
from factedit.studies.pool_base import PoolRequest, Relation, mentions

INSERTION_VERSION = 1
N_INSERTION = 12000  # requests, spread evenly over the relations
N_HELD = 50  # held-out invented subjects per relation, the neighbours' pool
N_NEIGHBOURS = 5

COUNTRIES = ("France", "Germany", "Italy", "Spain", "Portugal", "Poland", "Sweden", "Norway", "Finland", "Greece",
             "Turkey", "Egypt", "Nigeria", "Kenya", "Ghana", "Morocco", "India", "China", "Japan", "Korea",
             "Vietnam", "Thailand", "Indonesia", "Australia", "Canada", "Mexico", "Brazil", "Argentina", "Chile",
             "Peru", "Colombia", "Ireland", "Austria", "Hungary", "Romania", "Ukraine", "Russia", "Iran",
             "Pakistan", "Denmark")
LANGUAGES = ("French", "German", "Italian", "Spanish", "Portuguese", "Polish", "Swedish", "Norwegian", "Finnish",
             "Greek", "Turkish", "Arabic", "Swahili", "Hindi", "Bengali", "Chinese", "Japanese", "Korean",
             "Vietnamese", "Thai", "Russian", "Dutch", "Hungarian", "Romanian", "Ukrainian", "Persian", "Hebrew",
             "Tamil", "Czech", "Danish")
OCCUPATIONS = ("doctor", "lawyer", "teacher", "nurse", "pilot", "chef", "baker", "farmer", "plumber", "carpenter",
               "journalist", "painter", "sculptor", "poet", "novelist", "dentist", "pharmacist", "surgeon", "banker",
               "mechanic", "tailor", "butcher", "photographer", "composer", "physicist", "chemist", "biologist",
               "mathematician", "historian", "programmer", "firefighter", "librarian", "judge", "diplomat",
               "soldier", "sailor", "dancer", "singer")
INSTRUMENTS = ("piano", "guitar", "violin", "cello", "flute", "trumpet", "clarinet", "saxophone", "harp", "drums",
               "trombone", "banjo", "mandolin", "accordion", "harmonica", "bassoon", "tuba", "ukulele", "sitar",
               "bagpipes")
COMPANY_SUFFIXES = ("Industries", "Holdings", "Labs", "Group", "Systems", "Works", "Motors", "Foods", "Textiles",
                    "Robotics")

RELATIONS: tuple[Relation, ...] = (
    Relation("person_citizenship", "person", ("{} is a citizen of", "{} holds the citizenship of",
                                              "The country whose passport {} carries is"),
             "an invented person's country"),
    Relation("person_language", "person", ("The native language of {} is", "{} grew up speaking",
                                           "The mother tongue of {} is"), "an invented person's first language"),
    Relation("person_occupation", "person", ("By profession, {} is a", "{} works as a",
                                             "The profession of {} is that of a"), "an invented person's job"),
    Relation("person_instrument", "person", ("{} plays the", "The instrument {} plays is the",
                                             "{} is a musician who plays the"), "an invented musician's instrument"),
    Relation("company_country", "company", ("{} is headquartered in the country of",
                                            "The headquarters of {} are in the country of",
                                            "{} is a company based in the country of"),
             "an invented company's country"),
    Relation("town_country", "town", ("{} is a town in the country of", "The town of {} lies in the country of",
                                      "{} is located in the country of"), "an invented town's country"),
)
ATTRIBUTES = {"person_citizenship": COUNTRIES, "person_language": LANGUAGES, "person_occupation": OCCUPATIONS,
              "person_instrument": INSTRUMENTS, "company_country": COUNTRIES, "town_country": COUNTRIES}

_ONSETS = ("b", "br", "c", "ch", "d", "dr", "f", "g", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "pr", "r", "s",
           "st", "t", "tr", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "ai", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")


def _word(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def invented_name(kind: str, rng: random.Random) -> str:
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
    if kind == "company":
        return f"{_word(rng, 2)} {rng.choice(COMPANY_SUFFIXES)}"
    return _word(rng, 3)


def insertion_requests(seed: int = 0, limit: int | None = None, reserved: frozenset[str] = frozenset(),
                       n: int = N_INSERTION) -> list[PoolRequest]:
    """``n`` requests (the first ``limit``), one per invented subject; names in ``reserved``
    (e.g. real subjects) are never used. The relations take turns, so any prefix is balanced."""
    rng = random.Random(seed)
    used: set[str] = set(reserved)

    def fresh(kind: str) -> str:
        while True:
            name = invented_name(kind, rng)
            if name not in used:
                used.add(name)
                return name

    held = {r.name: [fresh(r.subject_kind) for _ in range(N_HELD)] for r in RELATIONS}
    out: list[PoolRequest] = []
    total = n if limit is None else min(n, limit)
    for i in range(total):
        rel = RELATIONS[i % len(RELATIONS)]
        subject = fresh(rel.subject_kind)
        attribute = rng.choice(ATTRIBUTES[rel.name])
        others = [s for s in held[rel.name] if not mentions(subject, rel.prompt(s))]
        neighbours = [rel.prompt(s) for s in rng.sample(others, N_NEIGHBOURS)]
        req = EditRequest(rel.templates[0], subject, attribute, None, paraphrase_prompts=rel.paraphrases(subject),
                          neighborhood_prompts=neighbours, case_id=i)
        out.append(PoolRequest(req, "insertion", rel.name, rel.subject_kind))
    return out
