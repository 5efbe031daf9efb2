"""Tokenizers built locally from a word list (tests and bench models never fetch one)."""
from __future__ import annotations

import re

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def word_level_tokenizer(words: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer over `words`, wrapping sequences in <bos> ... <eos>.

    It answers the calls diffusers pipelines make on T5/CLIP/Gemma tokenizers
    (padding="max_length", truncation, attention masks, batch_decode).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab["<bos>"], vocab["<eos>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=max_length,
        padding_side="right",
    )
    return fast


def words_of(texts: list[str]) -> list[str]:
    """The word list a tokenizer needs to cover `texts` without unknown tokens."""
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
