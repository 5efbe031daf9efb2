"""The mean quantization error per step, channel and latent position (README, "Beyond the paper").

Q-Drift+'s mean removal subtracts each step's mean error per channel. Part of the systematic error
has a spatial pattern the channel mean averages away (on the embedded default the per-position map,
beyond the channel mean, holds 3-10 % of the error energy, the channel mean 0.4-5 %;
experiments/results/matched_drift_probe.md). The map is the mean over R calibration runs of e at each
(step, channel, position), from the same teacher-forced paired runs as the Q-Drift statistics, and is
shrunk per step and channel toward zero by its standard error (vector James-Stein: a map the runs
do not resolve is scaled down, so removing it cannot add a bias of its own).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout import PACK, by_channel, check_layout


@dataclass
class ErrorSums:
    """Sums of e and e^2 over runs at every (step, channel, position), float64 (S, C, P), and the run count."""

    total: torch.Tensor
    total_sq: torch.Tensor
    runs: int

    def __add__(self, other: "ErrorSums") -> "ErrorSums":
        if self.total.shape != other.total.shape:
            raise ValueError(f"cannot join error maps of shapes {tuple(self.total.shape)} and {tuple(other.total.shape)}")
        return ErrorSums(self.total + other.total, self.total_sq + other.total_sq, self.runs + other.runs)

    def shrunk_mean(self) -> torch.Tensor:
        """(S, C, P) mean error, each step's and channel's map scaled by max(0, 1 - sum se^2 / sum mean^2)."""
        if self.runs < 2:
            raise ValueError(f"a mean error map needs at least 2 runs for its standard error, got {self.runs}")
        n = self.runs
        mean = self.total / n
        var = ((self.total_sq - n * mean**2) / (n - 1)).clamp_min(0)
        noise = (var / n).sum(dim=-1, keepdim=True)
        signal = (mean**2).sum(dim=-1, keepdim=True)
        return mean * (1 - noise / signal.clamp_min(1e-300)).clamp_min(0)


class ErrorMapAccumulator:
    """Accumulates e = u_quant - u_fp at every position (the `add` of calibration.PairedAccumulator)."""

    def __init__(self, num_steps: int, layout: str = "image"):
        check_layout(layout)
        self.num_steps, self.layout = num_steps, layout
        self.total: torch.Tensor | None = None
        self.total_sq: torch.Tensor | None = None
        self.runs = 0
        self.seen = torch.zeros(num_steps, dtype=torch.bool)

    def add(self, i: int, u_quant: torch.Tensor, u_fp: torch.Tensor) -> None:
        e = by_channel(u_quant.detach().double(), self.layout) - by_channel(u_fp.detach().double(), self.layout)
        if self.total is None:
            self.total = torch.zeros(self.num_steps, *e.shape[1:], dtype=torch.float64)
            self.total_sq = torch.zeros_like(self.total)
            self.runs = e.shape[0]
        self.total[i] += e.sum(0).cpu()
        self.total_sq[i] += (e**2).sum(0).cpu()
        self.seen[i] = True

    def sums(self) -> ErrorSums:
        if self.total is None or not bool(self.seen.all()):
            raise RuntimeError(f"the error map did not see steps {(~self.seen).nonzero().flatten().tolist()}")
        return ErrorSums(self.total, self.total_sq, self.runs)


def to_latent(m: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """A (C, P) map in the `by_channel` view, shaped to broadcast against latents `like` (the inverse view)."""
    check_layout(layout)
    m = m.to(device=like.device, dtype=torch.float32)
    if layout == "image":
        return m.reshape(1, *like.shape[1:])
    channels, positions = m.shape
    return m.reshape(channels, positions // PACK, PACK).permute(1, 0, 2).reshape(1, positions // PACK, channels * PACK)
