"""Subject spans from tokenizer offsets: byte-level BPE and word-level, start and middle."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import factedit
from factedit.analysis.spans import SubjectNotFoundError, fill_prompt, tokenize_with_subject
from factedit.errors import FactEditError

KNOWN = Path(factedit.__file__).resolve().parent / "data" / "known_1000.json"  # shipped in the package


def word_level_tokenizer():
    words = "the birthplace of ada lovelock is paris was born in beats music owned by apple".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.mark.parametrize("prompt,subject,span", [
    ("{} was born in", "ada lovelock", (0, 2)),
    ("the birthplace of {} is", "ada lovelock", (3, 5)),
    ("beats music is owned by", "beats music", (0, 2)),
])
def test_word_level(prompt, subject, span):
    tp = tokenize_with_subject(word_level_tokenizer(), prompt, subject)
    assert tp.subject_span == span


def test_byte_level_bpe_subject_at_start_and_middle(demo):
    _, tok, world = demo
    name = world.entities[0].name
    n = len(tok.encode(name))
    assert n >= 2
    tp = tokenize_with_subject(tok, "{} was born in", name)
    assert tp.subject_span == (0, n)
    tp = tokenize_with_subject(tok, "The birthplace of {} is", name)
    assert tp.subject_span == (3, 3 + n)
    assert tok.decode(tp.input_ids[3 : 3 + n]).strip() == name


def test_full_prompt_uses_the_last_occurrence(demo):
    _, tok, _ = demo
    tp = tokenize_with_subject(tok, "Paris is nice. Paris is the capital of", "Paris")
    assert tok.decode(tp.input_ids[tp.subject_span[0]:tp.subject_span[1]]).strip() == "Paris"
    assert tp.subject_span[0] > 2


@pytest.mark.parametrize("prompt,subject,start", [
    ("Ada met a friend in", "a", 8),  # not the "a" inside "Ada"
    ("Anna and Ann live in", "Ann", 9),
    ("Bob's son Bobby lives in", "Bob", 0),
    ("The C++ fan C lives in", "C", 12),
    ("xyz is in", "y", 1),  # no whole-word occurrence: the last one inside a word
])
def test_full_prompt_prefers_whole_words(prompt, subject, start):
    assert fill_prompt(prompt, subject) == (prompt, start)


def test_errors(demo):
    _, tok, _ = demo
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        tokenize_with_subject(tok, "Rome is the capital of", "Paris")
    with pytest.raises(FactEditError, match="empty"):
        tokenize_with_subject(tok, "  ", "Paris")
    with pytest.raises(FactEditError, match="relation must follow"):
        tokenize_with_subject(tok, "I love {}", "Paris")


def test_known_facts_spans_cover_the_subject_exactly(demo):
    _, tok, _ = demo
    facts = json.loads(KNOWN.read_text())
    assert len(facts) == 1209
    for f in facts:
        tp = tokenize_with_subject(tok, f["prompt"], f["subject"])
        s0, s1 = tp.subject_span
        text = tok.decode(tp.input_ids[s0:s1])
        assert f["subject"] in text, (f["known_id"], text)
        # the span is minimal: dropping its first or its last token loses part of the subject
        assert f["subject"] not in tok.decode(tp.input_ids[s0 + 1:s1])
        assert f["subject"] not in tok.decode(tp.input_ids[s0:s1 - 1])
