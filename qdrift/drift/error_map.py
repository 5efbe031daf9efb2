"""The mean quantization error per step, channel and latent position (README, "Beyond the paper").

Q-Drift+'s mean removal subtracts each step's mean error per channel. Part of the systematic error
has a spatial pattern the channel mean averages away (on the embedded default the per-position map,
beyond the channel mean, holds 3-10 % of the error energy, the channel mean 0.4-5 %;
experiments/results/matched_drift_probe.md). The map is the mean over R calibration runs of e at each
(step, channel, position), from the same teacher-forced paired runs as the Q-Drift statistics (untrimmed),
its channel mean and spatial residual each shrunk toward zero by their standard error (`ErrorSums`): a
part the runs do not resolve is scaled down, so removing it cannot add a bias of its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import PACK, by_channel, check_layout

SHRINKAGE_VERSION = 2   # in the map's key (stages/error_map.py): bump when shrunk_mean changes (1: one factor per map)


@dataclass
class ErrorSums:
    """Sums over runs of e and e^2 at every (step, channel, position), float64 (S, C, P), and of each run's
    channel mean squared (S, C): what the map and its standard errors need, joined by adding."""

    total: torch.Tensor
    total_sq: torch.Tensor
    channel_sq: torch.Tensor
    runs: int

    def __add__(self, other: "ErrorSums") -> "ErrorSums":
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot join error maps of shapes {tuple(self.total.shape)} and {tuple(other.total.shape)}")
        return ErrorSums(self.total + other.total, self.total_sq + other.total_sq, self.channel_sq + other.channel_sq,
                         self.runs + other.runs)

    def shrunk_mean(self) -> torch.Tensor:
        """(S, C, P) mean error: each step's channel mean and its spatial residual, each shrunk toward zero by
        its own standard error (positive-part James-Stein: m * max(0, 1 - se^2 / m^2), the residual as one
        vector per step and channel). Apart, so that a well resolved channel mean cannot carry an
        unresolved spatial pattern (noise every image would then have subtracted) along with it."""
        if self.runs < 2:
            raise ValueError(f"a mean error map needs at least 2 runs for its standard error, got {self.runs}")
        n = self.runs
        mean = self.total / n
        channel = mean.mean(dim=-1, keepdim=True)
        channel_var = ((self.channel_sq.unsqueeze(-1) - n * channel**2) / (n - 1)).clamp_min(0)   # over runs
        channel_keep = (1 - channel_var / n / (channel**2).clamp_min(1e-300)).clamp_min(0)
        residual = mean - channel
        noise = (((self.total_sq - n * mean**2) / (n - 1)).clamp_min(0) / n).sum(dim=-1, keepdim=True)
        residual_keep = (1 - noise / (residual**2).sum(dim=-1, keepdim=True).clamp_min(1e-300)).clamp_min(0)
        return channel * channel_keep + residual * residual_keep


class ErrorMapAccumulator:
    """Accumulates e = u_quant - u_fp at every position (the `add` of calibration.PairedAccumulator)."""

    def __init__(self, num_steps: int, layout: str = "image"):
        check_layout(layout)
        self.num_steps, self.layout = num_steps, layout
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.channel_sq: torch.Tensor | None = None
        self.runs = 0
        self.seen = torch.zeros(num_steps, dtype=torch.bool)

    def add(self, i: int, u_quant: torch.Tensor, u_fp: torch.Tensor) -> None:
        e = by_channel(u_quant.detach().double(), self.layout) - by_channel(u_fp.detach().double(), self.layout)
        if self.total is None:
            self.total = torch.zeros(self.num_steps, *e.shape[1:], dtype=torch.float64)
            self.total_sq = torch.zeros_like(self.total)
            self.channel_sq = torch.zeros(self.num_steps, e.shape[1], dtype=torch.float64)
            self.runs = e.shape[0]
        self.total[i] += e.sum(0).cpu()
        self.total_sq[i] += (e**2).sum(0).cpu()
        self.channel_sq[i] += (e.mean(dim=-1) ** 2).sum(0).cpu()
        self.seen[i] = True

    def sums(self) -> ErrorSums:
        if self.total is None or not bool(self.seen.all()):
            raise RuntimeError(f"the error map did not see steps {(~self.seen).nonzero().flatten().tolist()}")
        return ErrorSums(self.total, self.total_sq, self.channel_sq, self.runs)


def to_latent(m: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """A (C, P) map in the `by_channel` view, shaped to broadcast against latents `like` (the inverse view)."""
    check_layout(layout)
    m = m.to(device=like.device, dtype=torch.float32)
    if layout == "image":
        return m.reshape(1, *like.shape[1:])
    channels, positions = m.shape
    return m.reshape(channels, positions // PACK, PACK).permute(1, 0, 2).reshape(1, positions // PACK, channels * PACK)
