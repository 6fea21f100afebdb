"""Property-based tests (hypothesis).

- Subject spans, across tokenizers: the demo's byte-level BPE (prefix space), GPT-2-style
  byte-level BPEs (no prefix space, offsets with and without the leading space) and a
  word-level tokenizer. The subject anywhere in the prompt, words repeated around it, the
  subject occurring twice.
- Request files: random valid records round-trip; random corruptions give a FactEditError
  that names the record and the field, never another exception type.
"""

from __future__ import annotations

import json
import re
from functools import cache

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from factedit.analysis.spans import tokenize_with_subject
from factedit.editing.requests import EditRequest, load_requests, parse_record
from factedit.errors import FactEditError
from factedit.paths import demo_checkpoint

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
MORE = settings(SETTINGS, max_examples=100)  # request parsing is cheap

# words that every tokenizer below knows as whole words (the word-level one has no others)
WORDS = ["the", "of", "in", "was", "born", "is", "a", "capital", "city", "paris", "rome", "music", "beats",
         "owned", "by", "apple", "ada", "lovelace", "roric", "dunnford", "plays", "guitar", "and", "then", "he",
         "she", "lives", "near", "old", "new", "x", "it"]


@cache
def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    out = {"demo byte-level BPE": AutoTokenizer.from_pretrained(demo_checkpoint())}
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 3
    for trim in (False, True):
        bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=trim)
        bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
        out[f"GPT-2-style BPE (trim_offsets={trim})"] = PreTrainedTokenizerFast(
            tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    out["word-level"] = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")
    return out


NAMES = ["demo byte-level BPE", "GPT-2-style BPE (trim_offsets=False)", "GPT-2-style BPE (trim_offsets=True)",
         "word-level"]

words = st.lists(st.sampled_from(WORDS), min_size=0, max_size=5)
subjects = st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join)


def span_text(tok, tp) -> str:
    return tok.decode(tp.input_ids[tp.subject_span[0]:tp.subject_span[1]]).strip()


def check_span(tok, text: str, tp, c0: int, subject: str) -> None:
    """The span is exactly the tokens overlapping the subject's characters [c0, c0 + len)."""
    c1 = c0 + len(subject)
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    s0, s1 = tp.subject_span
    assert 0 <= s0 < s1 < len(tp.input_ids)  # a relation follows
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < c1 and e > c0
              and tok.decode([tp.input_ids[i]]).strip()]
    assert (s0, s1) == (inside[0], inside[-1] + 1)
    assert span_text(tok, tp) == subject
    # minimal: without its first or last token the subject is no longer all there
    assert tok.decode(tp.input_ids[s0 + 1:s1]).strip() != subject
    assert tok.decode(tp.input_ids[s0:s1 - 1]).strip() != subject


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(before=words, subject=subjects, after=st.lists(st.sampled_from(WORDS), min_size=1, max_size=5))
def test_template_span_is_the_subject_wherever_it_stands(name, before, subject, after):
    tok = tokenizers()[name]
    prompt = " ".join([*before, "{}", *after])
    tp = tokenize_with_subject(tok, prompt, subject)
    c0 = prompt.index("{}")
    assert tp.prompt == prompt.replace("{}", subject)
    check_span(tok, tp.prompt, tp, c0, subject)


@pytest.mark.parametrize("name", NAMES)
@SETTINGS
@given(subject=subjects, middle=words, after=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4),
       lead=st.booleans())
def test_repeated_words_and_a_subject_twice(name, subject, middle, after, lead):
    """The subject's own words repeated around it, and the subject itself twice: a template
    marks the occurrence to use; a full prompt uses the last one (nearest the prediction)."""
    tok = tokenizers()[name]
    first = [] if lead else ["the"]
    # template: the subject also stands before the '{}' and its words after it
    template = " ".join([*first, subject, *middle, "{}", *subject.split(), *after])
    tp = tokenize_with_subject(tok, template, subject)
    check_span(tok, tp.prompt, tp, template.index("{}"), subject)
    # full prompt with the subject twice: the last occurrence
    full = " ".join([*first, subject, *middle, subject, *after])
    # the last whole-word occurrence ('a' inside 'ada' does not count), found by hand
    n = len(subject)
    c0 = [i for i in range(len(full)) if full.startswith(subject, i)
          and full[i - 1: i] in ("", " ") and full[i + n: i + n + 1] in ("", " ")][-1]
    if c0 + len(subject) == len(full):
        with pytest.raises(FactEditError, match="relation must follow"):
            tokenize_with_subject(tok, full, subject)
        return
    check_span(tok, full, tokenize_with_subject(tok, full, subject), c0, subject)


# ---- request files -------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s.strip() and "{}" not in s)
maybe_text = st.none() | text
case_ids = st.none() | st.integers(-10**6, 10**6) | text


@st.composite
def valid_records(draw):
    subject = draw(text)
    if draw(st.booleans()):
        prompt = draw(st.just("") | text) + "{}" + draw(text)
    else:
        prompt = draw(st.just("") | text) + subject + draw(st.just("") | text)
    assume(prompt.count("{}") <= 1)  # '{' and '}' meeting where the pieces join
    new = draw(text)
    true = draw(maybe_text.filter(lambda t: t is None or t.strip() != new.strip()))
    rec = {"prompt": prompt, "subject": subject, "target_new": new}
    if true is not None:
        rec["target_true"] = true
    if draw(st.booleans()):  # paraphrases ask about the subject
        rec["paraphrase_prompts"] = draw(st.lists(st.tuples(text, text).map(lambda t: t[0] + subject + t[1]),
                                                  max_size=3))
    if draw(st.booleans()):  # neighbourhood prompts: never the edited fact itself
        edited = {" ".join(x.split()) for x in [prompt.replace("{}", subject), *rec.get("paraphrase_prompts", [])]}
        rec["neighborhood_prompts"] = draw(st.lists(text.filter(lambda t: " ".join(t.split()) not in edited),
                                                    max_size=3))
    case_id = draw(case_ids)
    if case_id is not None:
        rec["case_id"] = case_id
    if draw(st.booleans()):  # CounterFact's layout
        rw = {k: rec.pop(k) for k in ("prompt", "subject", "target_new", "target_true") if k in rec}
        for k in ("target_new", "target_true"):
            if k in rw and draw(st.booleans()):
                rw[k] = {"str": rw[k], "id": "Q1"}
        rec["requested_rewrite"] = rw
    return rec


def expected(rec: dict, index: int) -> EditRequest:
    rw = rec.get("requested_rewrite", rec)
    get = (lambda k: rw[k]["str"] if isinstance(rw.get(k), dict) else rw.get(k))  # noqa: E731
    return EditRequest(get("prompt"), get("subject"), get("target_new"), get("target_true"),
                       rec.get("paraphrase_prompts", []), rec.get("neighborhood_prompts", []),
                       rec.get("case_id", index))


def write(path, records, jsonl: bool) -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n" if jsonl else json.dumps(records))


def _fact(rec: dict) -> tuple[str, str]:
    """What a record edits: two records about the same prompt and subject with different new
    targets conflict, and a file holding both is refused (not a valid file)."""
    r = expected(rec, 0)
    return r.filled_prompt.strip(), r.subject.strip()


VALID_FILES = st.lists(valid_records(), min_size=1, max_size=4, unique_by=_fact)


@MORE
@given(records=VALID_FILES, jsonl=st.booleans())
def test_valid_records_round_trip(tmp_path, records, jsonl):
    path = tmp_path / "r.json"
    write(path, records, jsonl)
    got = load_requests(path)
    assert got == [expected(r, i) for i, r in enumerate(records)]
    assert [parse_record(r.to_dict(), i) for i, r in enumerate(got)] == got


REQUIRED = ("prompt", "subject", "target_new")
BAD_VALUES = [None, 3, 2.5, True, [], ["x"], {}, {"id": 1}, {"str": 7}, "", "   "]


@st.composite
def corrupted(draw):
    """Valid records with one of them broken; returns (records, index, field or None)."""
    records = draw(VALID_FILES)
    i = draw(st.integers(0, len(records) - 1))
    rec = json.loads(json.dumps(records[i]))
    rw = rec.get("requested_rewrite", rec)
    kind = draw(st.sampled_from(["drop", "bad value", "two holes", "not in prompt", "same targets", "lists",
                                 "case_id", "rewrite", "not an object"]))
    field = draw(st.sampled_from(REQUIRED))
    if kind == "drop":
        del rw[field]
    elif kind == "bad value":
        rw[field] = draw(st.sampled_from(BAD_VALUES))
    elif kind == "two holes":
        rw["prompt"], field = "{} and {} " + draw(text), "prompt"
    elif kind == "not in prompt":
        rw["prompt"], field = "Zq" * 20, "prompt"
        rw["subject"] = "Xy" * 3
    elif kind == "same targets":
        rw["target_true"], field = draw(st.sampled_from([rw["target_new"], {"str": rw["target_new"]}])), "target_true"
    elif kind == "lists":
        field = draw(st.sampled_from(["paraphrase_prompts", "neighborhood_prompts"]))
        rec[field] = draw(st.sampled_from(["x", 5, None, [1], ["ok", None], {"a": 1}]))
    elif kind == "case_id":
        rec["case_id"], field = draw(st.sampled_from([[1], {"a": 1}, 1.5, True, False])), "case_id"
    elif kind == "rewrite":
        rec = {"requested_rewrite": draw(st.sampled_from([None, "x", 3, ["p"]]))}
        field = "requested_rewrite"
    else:
        rec, field = draw(st.sampled_from([None, 3, "x", ["a"], True])), None
    records[i] = rec
    return records, i, field


@MORE
@given(case=corrupted(), jsonl=st.booleans())
def test_corrupt_records_name_the_record_and_the_field(tmp_path, case, jsonl):
    records, i, field = case
    path = tmp_path / "r.json"
    write(path, records, jsonl)
    with pytest.raises(FactEditError) as info:  # and nothing else: another type fails the test
        load_requests(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(rf"\brecord {i}\b", msg), msg
    if field is not None:
        assert f"'{field}'" in msg, msg


@MORE
@given(data=st.binary(min_size=1, max_size=64))
def test_any_bytes_give_a_request_error_or_requests(tmp_path, data):
    path = tmp_path / "r.json"
    path.write_bytes(data)
    try:
        reqs = load_requests(path)
    except FactEditError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(isinstance(r, EditRequest) for r in reqs)
