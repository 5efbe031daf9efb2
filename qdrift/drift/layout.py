"""Latent layouts: where the latent channels live in the tensors a scheduler sees.

"image" latents are (B, C, H, W) (or any (B, C, ...)); FLUX packs 2x2 patches into the last
dimension, (B, N, C*4) with index c*4 + dy*2 + dx, so its per-channel statistics map each packed
feature back to its latent channel.
"""
from __future__ import annotations

import torch

LAYOUTS = ("image", "packed")
PACK = 4  # FLUX packs 2x2 spatial positions per token


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown latent layout {layout!r}; known: {LAYOUTS}")


def by_channel(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View `x` as (B, C, L): batch, latent channel, every position of that channel."""
    if layout == "image":
        return x.reshape(x.shape[0], x.shape[1], -1)
    check_layout(layout)
    b, n, d = x.shape
    return x.reshape(b, n, d // PACK, PACK).permute(0, 2, 1, 3).reshape(b, d // PACK, n * PACK)


def num_channels(x: torch.Tensor, layout: str) -> int:
    return x.shape[1] if layout == "image" else x.shape[-1] // PACK


def broadcastable(v: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """Shape a per-channel vector (C,) or a scalar (1,) so that it broadcasts against latents `like`."""
    v = v.to(device=like.device)
    if v.numel() == 1:
        return v.reshape((1,) * like.ndim)
    if layout == "image":
        return v.reshape(1, -1, *([1] * (like.ndim - 2)))
    check_layout(layout)
    return v.repeat_interleave(PACK).reshape(1, 1, -1)
