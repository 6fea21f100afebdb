"""Subject token positions from the tokenizer's character offsets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from factedit.errors import FactEditError


class SubjectNotFoundError(FactEditError):
    pass


class PromptError(FactEditError):
    pass


def target_token_ids(tok, prompt_text: str, target: str) -> list[int]:
    """The tokens ``target`` adds after ``prompt_text`` (a space is put in between unless the
    target starts with whitespace). Tokenising the concatenation keeps the tokenizer's own
    word-boundary handling (byte-level BPE and SentencePiece alike)."""
    if not target.strip():
        raise PromptError("the target is empty: give the new attribute's text, e.g. 'Paris'")
    sep = "" if target[:1].isspace() else " "
    base = tok(prompt_text)["input_ids"]
    full = tok(prompt_text + sep + target)["input_ids"]
    ids = full[len(base):] if full[: len(base)] == base else tok.encode(sep + target, add_special_tokens=False)
    if not ids:
        raise PromptError(f"the target {target!r} tokenizes to nothing: give a non-empty word")
    return list(ids)


@dataclass(frozen=True)
class TokenizedPrompt:
    prompt: str
    input_ids: list[int]
    subject_span: tuple[int, int]  # [start, end) in tokens
    bos: bool = False  # position 0 is a special token the tokenizer added (a BOS, as Gemma's)

    @property
    def last_subject(self) -> int:
        return self.subject_span[1] - 1

    @property
    def last(self) -> int:
        return len(self.input_ids) - 1


def fill_prompt(prompt: str, subject: str) -> tuple[str, int]:
    """A template with ``{}`` or a full prompt -> (full prompt, subject's char start).

    In a full prompt the subject's last occurrence as a whole word is used (the one nearest to
    the prediction; "a" is not found inside "Ada"), else its last occurrence inside a word.
    """
    from factedit.validate import prompt_problem

    problem = prompt_problem(prompt, subject, "the prompt", "the subject")
    if problem is not None:
        raise (SubjectNotFoundError if "does not occur" in problem else FactEditError)(problem)
    if "{}" in prompt:
        return prompt.replace("{}", subject), prompt.index("{}")
    return prompt, _last_occurrence(prompt, subject)


def _last_occurrence(prompt: str, subject: str) -> int:
    before = r"(?<!\w)" if _wordish(subject[0]) else ""
    after = r"(?!\w)" if _wordish(subject[-1]) else ""
    whole = list(re.finditer(before + "(?=" + re.escape(subject) + after + ")", prompt))  # overlapping too
    return whole[-1].start() if whole else prompt.rfind(subject)


def _wordish(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def tokenize_with_subject(tokenizer, prompt: str, subject: str) -> TokenizedPrompt:
    """Tokenise ``prompt`` (no special tokens added beyond the tokenizer's own BOS) and find
    the tokens that overlap the subject's characters."""
    text, c0 = fill_prompt(prompt, subject)
    c1 = c0 + len(subject)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    # a whitespace-only token (e.g. the prefix space some tokenizers add, whose offsets
    # point at the first character) never belongs to the subject
    pos = [i for i, (s, e) in enumerate(offsets)
           if e > s and s < c1 and e > c0 and tokenizer.decode([ids[i]]).strip()]
    if not pos:
        raise SubjectNotFoundError(f"no token of {text!r} covers the subject {subject!r}")
    span = (pos[0], pos[-1] + 1)
    if span[1] >= len(ids):
        raise FactEditError(
            f"the subject {subject!r} ends the prompt {text!r}: a relation must follow the subject "
            "so that the last position can predict the attribute"
        )
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    bos = bool(ids) and ids[0] in special and offsets[0][0] == offsets[0][1]
    return TokenizedPrompt(text, list(ids), span, bos=bos)
