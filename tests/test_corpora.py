"""The sampled statistics corpus: factedit's nucleus sampler (large vocabularies) against a
naive full-sort, no-cache reference."""

import pytest
import torch

from factedit.editing.corpora import nucleus_filter, nucleus_sample

from .families import tiny_model


def naive_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Sort every row in full; keep the sorted prefix up to and including the first token at
    which the cumulative mass reaches ``top_p``; renormalise."""
    probs = torch.softmax(logits, -1)
    out = torch.zeros_like(probs)
    for r in range(probs.shape[0]):
        p, i = probs[r].sort(descending=True)
        n = int((p.cumsum(0) < top_p).sum()) + 1  # tokens before the mass reaches top_p, plus that one
        out[r, i[:n]] = p[:n] / p[:n].sum()
    return out


def test_nucleus_filter_matches_a_full_sort_with_and_without_the_top_k_shortcut():
    """Rows whose nucleus lies inside the top k (peaked) and rows that need the full sort
    (flat, k = 16 of 5,000); float64, so the two agree to rounding (1e-12)."""
    g = torch.Generator().manual_seed(0)
    flat = torch.randn(3, 5000, generator=g, dtype=torch.float64)
    peaked = flat.clone()
    peaked[:, :5] += 12.0
    logits = torch.cat([flat, peaked])  # (6, 5000)
    for p in (0.5, 0.95):
        want = naive_nucleus(logits, p)
        got = nucleus_filter(logits, p, k=16)
        assert got.dtype == torch.float32 or got.dtype == torch.float64
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)  # softmax in float32
        assert ((got > 0) == (want > 0)).all()  # the same nucleus, token for token
    assert (naive_nucleus(logits[:3], 0.95) > 0).sum(-1).min() > 16  # the flat rows did need the sort


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_nucleus_sample_matches_a_no_cache_full_sort_loop(family):
    """The KV-cached sampler (left padding, positions from the mask, last logits only)
    draws the same tokens as recomputing the whole padded batch every step and sorting the
    whole vocabulary, with the same generator. Float32: in float64 transformers' eager
    attention turns a left-padded row into NaN (its padding queries see no key); the two
    paths' logits differ by rounding (1e-6), far from moving a draw."""
    from .test_locate import word_tokenizer

    model = tiny_model(family, dtype=torch.float32)
    tok = word_tokenizer()
    tok.pad_token = "[UNK]"
    tok.padding_side = "left"
    enc = tok(["the capital of", "beats", "music is owned by"], return_tensors="pt", padding=True)
    got = nucleus_sample(model, enc, 6, 0.9, stop=set(), gen=torch.Generator().manual_seed(3))  # (3, 6)

    gen = torch.Generator().manual_seed(3)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    want = []
    with torch.no_grad():
        for _ in range(6):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
            nxt = torch.multinomial(naive_nucleus(logits, 0.9).float(), 1, generator=gen)
            want.append(nxt)
            ids, mask = torch.cat([ids, nxt], -1), torch.cat([mask, torch.ones_like(nxt)], -1)
    assert torch.equal(got, torch.cat(want, -1))


def test_nucleus_sample_stops_when_every_row_has_stopped():
    model = tiny_model("llama", dtype=torch.float32)
    enc = {"input_ids": torch.tensor([[5, 6]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    every = set(range(model.config.vocab_size))
    assert nucleus_sample(model, enc, 8, 0.9, stop=every, gen=torch.Generator().manual_seed(0)).shape == (1, 1)
