"""Outlier trimming scope: per run and step (calibration) or over all runs of a step (the authors')."""
from __future__ import annotations

import torch

from qdrift.drift import moments


def test_global_trim_equals_trimming_all_runs_as_one_row():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, 400, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0])[:, None]
    u = torch.randn(5, 400, generator=g, dtype=torch.float64) + e
    pooled = moments.reduce(moments.trimmed_moments(u, e, 3.0, over=(0, -1)), 0)
    assert torch.allclose(pooled, moments.trimmed_moments(u.reshape(1, -1), e.reshape(1, -1), 3.0)[0])
    per_run = moments.reduce(moments.trimmed_moments(u, e, 3.0), 0)
    # The wide run keeps its tails when trimmed against itself, loses them against all runs.
    assert per_run[moments.N] > pooled[moments.N]
    assert torch.equal(moments.trimmed_moments(u, e, 3.0), moments.trimmed_moments(u, e, 3.0, over=(-1,)))
