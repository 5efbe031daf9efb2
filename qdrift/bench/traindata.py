"""Training tensors for one invocation: rendered once on the device, tokenised once, kept there."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from .grammar import MAX_TOKENS
from .dataset import TRAIN_RENDER_SEED, training_set
from .render import render
from .tokens import token_ids


@dataclass
class TrainData:
    images: torch.Tensor              # uint8 [N, 3, 64, 64] on the device
    ids: torch.Tensor                 # int64 [N, L]
    mask: torch.Tensor                # int64 [N, L]
    neg_ids: torch.Tensor | None      # int64 [N, K, L]: one-attribute swaps (eval CLIP hard negatives)
    empty_ids: torch.Tensor           # [1, L]: the empty caption "" (classifier-free guidance dropout)
    empty_mask: torch.Tensor
    latents: torch.Tensor | None = None   # float [N, 4, 16, 16], VAE means times scaling factor

    def __len__(self) -> int:
        return self.images.shape[0]

    def batch_index(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, len(self), (batch_size,), generator=gen, device=self.images.device)


def prepare(n: int, seed: int, negatives: int, tokenizer, device: torch.device, log=print,
            render_chunk: int = 8192) -> TrainData:
    t0 = time.monotonic()
    workers = min(os.cpu_count() or 1, 16) if n > 20_000 else 1
    scenes, caps, negs = training_set(n, seed, negatives, workers=workers)
    t1 = time.monotonic()
    ids, mask = token_ids(tokenizer, caps, MAX_TOKENS)
    neg_ids = token_ids(tokenizer, [c for row in negs for c in row], MAX_TOKENS)[0].view(n, negatives, MAX_TOKENS) \
        if negatives else None
    empty_ids, empty_mask = token_ids(tokenizer, [""], MAX_TOKENS)
    images = torch.empty(n, 3, 64, 64, dtype=torch.uint8, device=device)
    for a in range(0, n, render_chunk):
        b = min(a + render_chunk, n)
        rgb = render(scenes[a:b], seed=TRAIN_RENDER_SEED + seed, device=device, start_index=a)
        images[a:b] = (rgb * 255).round().to(torch.uint8)
    to = dict(device=device)
    data = TrainData(images, ids.to(**to), mask.to(**to), None if neg_ids is None else neg_ids.to(**to),
                     empty_ids.to(**to), empty_mask.to(**to))
    if device.type == "cuda":
        torch.cuda.synchronize()
    log(f"[data] {n} training scenes ({workers} workers, {t1 - t0:.1f}s), tokenised and rendered on {device} "
        f"in {time.monotonic() - t1:.1f}s")
    return data


@torch.no_grad()
def encode_latents(data: TrainData, vae, scaling_factor: float, batch_size: int = 1024) -> torch.Tensor:
    """VAE posterior means of every training image, times the scaling factor (what the pipelines decode)."""
    parts = [vae.encode(data.images[a:a + batch_size].float() / 127.5 - 1).latent_dist.mean.float() * scaling_factor
             for a in range(0, len(data), batch_size)]
    return torch.cat(parts)
