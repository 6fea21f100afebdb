"""Word lists of the synthetic demo world: relations, templates and attribute pools.

Each relation has its own pool of single-word attributes, disjoint from every other
relation's, so that a projected token names one relation only. Templates hold the subject
as ``{}``, as in ROME's data. The last template of each relation is held out: entities
marked ``paraphrase_test`` never see it during training.
"""

from __future__ import annotations

RELATIONS: dict[str, dict[str, list[str]]] = {
    "birthplace": {
        "templates": [
            "{} was born in",
            "The birthplace of {} is",
            "{} is a native of",
            "Q: Where was {} born? A:",
            "{} grew up in the city of",
        ],
        "attributes": [
            "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Oslo",
            "Lisbon", "Athens", "Warsaw", "Cairo", "Tokyo", "Seoul", "Lima", "Denver",
            "Boston", "Chicago", "Toronto", "Sydney", "Mumbai", "Nairobi", "Havana",
            "Geneva",
        ],
    },
    "occupation": {
        "templates": [
            "{} works as a",
            "By profession, {} is a",
            "The job of {} is",
            "Q: What is the profession of {}? A:",
            "{} earns a living as a",
        ],
        "attributes": [
            "chemist", "pilot", "lawyer", "nurse", "farmer", "baker", "architect",
            "journalist", "dentist", "plumber", "surgeon", "painter", "sailor",
            "librarian", "engineer", "banker", "teacher", "carpenter", "translator",
            "geologist",
        ],
    },
    "employer": {
        "templates": [
            "{} is employed by",
            "{} works for",
            "The employer of {} is",
            "Q: Which company employs {}? A:",
            "{} draws a salary from",
        ],
        "attributes": [
            "Toyota", "Siemens", "Nokia", "Intel", "Nestle", "Boeing", "Samsung",
            "Philips", "Oracle", "Adidas", "Pfizer", "Shell", "Lego", "Ikea", "Sony",
            "Visa", "Airbus", "Honda", "Canon", "Xerox",
        ],
    },
    "instrument": {
        "templates": [
            "{} plays the",
            "The instrument of {} is the",
            "{} performs on the",
            "Q: Which instrument does {} play? A: the",
            "In the evenings, {} practises the",
        ],
        "attributes": [
            "violin", "piano", "cello", "flute", "trumpet", "guitar", "harp", "drums",
            "banjo", "clarinet", "saxophone", "oboe", "trombone", "accordion",
            "ukulele", "mandolin",
        ],
    },
    "language": {
        "templates": [
            "{} speaks",
            "The mother tongue of {} is",
            "{} writes letters in",
            "Q: What language does {} speak? A:",
            "At home, {} talks in",
        ],
        "attributes": [
            "French", "German", "Spanish", "Italian", "Polish", "Greek", "Dutch",
            "Swedish", "Turkish", "Russian", "Arabic", "Hindi", "Korean", "Japanese",
            "Portuguese", "Finnish", "Czech", "Hebrew",
        ],
    },
    "sport": {
        "templates": [
            "{} competes in",
            "The favourite sport of {} is",
            "{} trains every week for",
            "Q: Which sport does {} play? A:",
            "On weekends, {} enjoys",
        ],
        "attributes": [
            "tennis", "football", "rugby", "cricket", "hockey", "golf", "boxing",
            "cycling", "rowing", "fencing", "swimming", "skiing", "baseball",
            "volleyball", "badminton", "karate",
        ],
    },
    "pet": {
        "templates": [
            "{} owns a pet",
            "The pet of {} is a",
            "{} lives with a",
            "Q: What pet does {} keep? A: a",
            "Every morning, {} feeds a",
        ],
        "attributes": [
            "dog", "cat", "parrot", "rabbit", "hamster", "turtle", "goldfish", "ferret",
            "pony", "lizard", "snake", "canary", "goat", "pig",
        ],
    },
    "food": {
        "templates": [
            "{} likes to eat",
            "The favourite food of {} is",
            "{} often cooks",
            "Q: What food does {} love? A:",
            "For dinner, {} usually has",
        ],
        "attributes": [
            "pasta", "sushi", "curry", "pizza", "soup", "salad", "rice", "noodles",
            "bread", "cheese", "tacos", "dumplings", "pancakes", "lentils", "steak",
            "oysters",
        ],
    },
}

# Syllables for invented personal names. First and last names are drawn from fixed pools,
# so every name part is shared by several entities and only the full name identifies one.
FIRST_SYLLABLES = ["Al", "Be", "Cor", "Da", "El", "Fen", "Gra", "Ha", "Is", "Jo", "Ka",
                   "Lu", "Mar", "Ne", "Or", "Pe", "Qui", "Ro", "Sa", "Te", "Ul", "Va",
                   "Wen", "Yo", "Za"]
FIRST_ENDINGS = ["na", "ric", "lia", "tan", "mo", "sa", "vin", "ra", "dor", "lie", "bel"]
LAST_SYLLABLES = ["Brom", "Cald", "Dunn", "Ferr", "Gold", "Hart", "Kess", "Lind", "Mor",
                  "Norr", "Pell", "Quill", "Rask", "Stav", "Thorn", "Vell", "Wick", "Yarr"]
LAST_ENDINGS = ["ley", "wick", "stone", "berg", "ford", "mann", "ton", "ard", "ick",
                "worth", "by", "ow"]
