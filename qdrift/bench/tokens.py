"""Bulk token ids for canonical captions: a dictionary lookup, ~30x faster than the HF call on CPU.

Training tokenises hundreds of thousands of captions per invocation; the result is identical to
`tokenizer(texts, padding="max_length", max_length=..., truncation=True)` for bench captions
(a test checks it), and unknown words fail loudly instead of becoming <unk>.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def token_ids(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [N, max_length] int64 for whitespace-separated lower-case captions."""
    vocab = tokenizer.get_vocab()
    bos, eos, pad = vocab["<bos>"], vocab["<eos>"], vocab["<pad>"]
    rows = []
    for text in texts:
        try:
            row = [bos] + [vocab[w] for w in text.lower().split()] + [eos]
        except KeyError as err:
            raise ValueError(f"word {err} of {text!r} is not in the bench vocabulary") from None
        if len(row) > max_length:
            raise ValueError(f"caption longer than {max_length} tokens: {text!r}")
        rows.append(row + [pad] * (max_length - len(row)))
    ids = torch.tensor(rows, dtype=torch.int64).view(len(rows), max_length)
    return ids, (ids != pad).long()
