"""A byte-level BPE tokenizer like GPT-2's, trained on the world's text with `tokenizers`."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from factedit.world.corpus import tokenizer_corpus
from factedit.world.generate import World

EOS = "<|endoftext|>"


def train_tokenizer(world: World, vocab_size: int = 2048, seed: int = 0) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    # a leading space is added to every text, so a name is the same tokens at the start of a
    # text as after a word (otherwise every entity has two spellings to learn)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(world, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, pad_token=EOS)
    fast.model_max_length = 128
    return fast
