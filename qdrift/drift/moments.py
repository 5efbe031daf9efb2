"""Streaming paired moments of (u, e) in float64.

A moment record holds, along its last axis, [n, mean_u, mean_e, M_uu, M_ee, M_ue] where the M's
are centred sums of products. Records of disjoint data merge exactly (Chan et al.'s parallel
update), so per-run records can be pooled over any subset of runs, steps or channels later
without touching the models again.
"""
from __future__ import annotations

import math

import torch

N, MU_U, MU_E, M_UU, M_EE, M_UE = range(6)
FIELDS = 6


def moments_of(u: torch.Tensor, e: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Moment records of the rows of u, e (shape (..., L)) -> (..., 6), optionally over `keep` only."""
    u, e = u.double(), e.double()
    w = torch.ones_like(u) if keep is None else keep.double()
    n = w.sum(-1)
    safe = n.clamp_min(1)
    mu_u = (w * u).sum(-1) / safe
    mu_e = (w * e).sum(-1) / safe
    du, de = (u - mu_u[..., None]) * w, (e - mu_e[..., None]) * w
    return torch.stack([n, mu_u, mu_e, (du * du).sum(-1), (de * de).sum(-1), (du * de).sum(-1)], -1)


def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Moments of the union of the data behind records `a` and `b` (broadcasting)."""
    na, nb = a[..., N], b[..., N]
    n = na + nb
    safe = n.clamp_min(1)
    du, de = b[..., MU_U] - a[..., MU_U], b[..., MU_E] - a[..., MU_E]
    f = na * nb / safe
    return torch.stack([
        n,
        a[..., MU_U] + du * nb / safe,
        a[..., MU_E] + de * nb / safe,
        a[..., M_UU] + b[..., M_UU] + du * du * f,
        a[..., M_EE] + b[..., M_EE] + de * de * f,
        a[..., M_UE] + b[..., M_UE] + du * de * f,
    ], -1)


def reduce(records: torch.Tensor, dim: int) -> torch.Tensor:
    """Merge records along `dim` (any axis but the last) in one vectorised pass."""
    dim = dim % records.ndim
    if dim == records.ndim - 1:
        raise ValueError("cannot reduce over the moment-field axis")
    n_k = records[..., N]
    n = n_k.sum(dim)
    safe = n.clamp_min(1)
    mu_u = (n_k * records[..., MU_U]).sum(dim) / safe
    mu_e = (n_k * records[..., MU_E]).sum(dim) / safe
    du = records[..., MU_U] - mu_u.unsqueeze(dim)
    de = records[..., MU_E] - mu_e.unsqueeze(dim)
    return torch.stack([
        n, mu_u, mu_e,
        (records[..., M_UU] + n_k * du * du).sum(dim),
        (records[..., M_EE] + n_k * de * de).sum(dim),
        (records[..., M_UE] + n_k * du * de).sum(dim),
    ], -1)


def trimmed_moments(u: torch.Tensor, e: torch.Tensor, trim_std: float, over: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Moments of rows (..., L) after dropping |e - mean(e)| > trim_std * std(e) within each row.

    Trimming inside each (run, step, channel-pool) row keeps calibration single-pass: the rows
    are in memory when they are reduced, and pooled records stay exact merges of per-run records.
    `over` names the axes whose pooled mean and std set the threshold: (0, -1) on (runs, ..., L)
    trims against all runs at once (the authors' global trim, which needs every run in memory).
    """
    if trim_std is None or trim_std <= 0:
        return moments_of(u, e)
    e64 = e.double()
    mean = e64.mean(over, keepdim=True)
    count = math.prod(e.shape[d] for d in over)
    std = e64.std(over, keepdim=True, unbiased=True) if count > 1 else torch.zeros_like(mean)
    keep = (e64 - mean).abs() <= trim_std * std
    keep |= std == 0  # a constant error has no outliers
    return moments_of(u, e, keep)


def covariance(records: torch.Tensor) -> dict[str, torch.Tensor]:
    """Unbiased means/variances/covariance of merged records."""
    dof = (records[..., N] - 1).clamp_min(1)
    return {
        "n": records[..., N],
        "mu_u": records[..., MU_U],
        "mu_e": records[..., MU_E],
        "s_uu": records[..., M_UU] / dof,
        "s_ee": records[..., M_EE] / dof,
        "s_ue": records[..., M_UE] / dof,
    }
