"""Fréchet distance (FID) and kernel distance (KID) between two sets of precomputed features.

FID between Gaussians N(mu_a, S_a) and N(mu_b, S_b):
    |mu_a - mu_b|^2 + tr S_a + tr S_b - 2 tr sqrt(S_a S_b).
We never form sqrt(S_a S_b). With any factorisations S = F^T F, the non-zero eigenvalues of
S_a S_b = F_a^T (F_a F_b^T) F_b equal those of M M^T with M = F_a F_b^T, so
tr sqrt(S_a S_b) = sum of singular values of M (its nuclear norm). This is exact, needs no
complex arithmetic (unlike scipy's sqrtm), and handles rank-deficient covariances (D > N)
without regularisation: when a set has no more rows than dimensions its centred rows are the
factor and M is only (n_a x n_b). All in float64.

Sets can carry bootstrap counts (row i drawn counts[i] times): the weighted moments equal those
of the resampled array, without copying it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.image.kid import maximum_mean_discrepancy, poly_kernel, poly_mmd


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance factor (``factor.mT @ factor`` = unbiased covariance); may carry batch dims."""

    mean: Tensor  # (..., D) float64
    factor: Tensor  # (..., r, D) float64


def _as_float64_2d(feats: Tensor) -> Tensor:
    x = feats.to(torch.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    return x


def weighted_moments(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Means (B, D) and unbiased covariances (B, D, D) of `x` (N, D) under count weights (B, N)."""
    weights = weights.to(x.dtype)
    n = weights.sum(-1, keepdim=True)  # (B, 1)
    if bool((n < 2).any()):
        raise ValueError("need at least 2 feature rows to estimate a covariance")
    center = x.mean(0)
    xc = x - center  # centring first keeps sum(w x x^T) - n mu mu^T free of cancellation
    mean_c = (weights @ xc) / n  # (B, D)
    second = (xc.mT.unsqueeze(0) * weights.unsqueeze(1)) @ xc  # (B, D, D) = sum_i w_i xc_i xc_i^T
    cov = (second - n.unsqueeze(-1) * mean_c.unsqueeze(-1) * mean_c.unsqueeze(-2)) / (n.unsqueeze(-1) - 1)
    return center + mean_c, cov


def _cov_factors(x: Tensor, weights: Tensor) -> GaussianStats:
    """(B, D, D) eigen-factors of the weighted covariances of `x` (N, D) for weights (B, N)."""
    mean, cov = weighted_moments(x, weights)
    evals, evecs = torch.linalg.eigh(cov)
    # Tiny negative eigenvalues are rounding noise of a PSD matrix; their factor rows become zero.
    return GaussianStats(mean, (evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)).mT)


def gaussian_stats(feats: Tensor, counts: Tensor | None = None) -> GaussianStats:
    """Gaussian statistics of `feats` (N, D), optionally with bootstrap multiplicities `counts` (N,)."""
    x = _as_float64_2d(feats)
    if counts is None:
        w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    else:
        w = counts.to(x.device, torch.float64)
    keep = w > 0
    x, w = x[keep], w[keep]
    if x.shape[0] > x.shape[1]:  # more rows than dimensions: a D x D factor is smaller
        stats = _cov_factors(x, w.unsqueeze(0))
        return GaussianStats(stats.mean[0], stats.factor[0])
    n = w.sum()
    if n < 2:
        raise ValueError("need at least 2 feature rows to estimate a covariance")
    mean = (w @ x) / n
    return GaussianStats(mean, (x - mean) * torch.sqrt(w / (n - 1)).unsqueeze(1))


def frechet_from_stats(a: GaussianStats, b: GaussianStats) -> Tensor:
    """Fréchet distance between Gaussians given as `GaussianStats` (float64; batch dims broadcast)."""
    mean_term = (a.mean - b.mean).square().sum(-1)
    trace_term = a.factor.square().sum((-2, -1)) + b.factor.square().sum((-2, -1))
    cross = torch.linalg.svdvals(a.factor @ b.factor.mT).sum(-1)
    return mean_term + trace_term - 2.0 * cross


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """FID between feature sets (N_a, D) and (N_b, D): float64, exact for rank-deficient covariances."""
    if feats_a.shape[-1] != feats_b.shape[-1]:
        raise ValueError(f"feature dims differ: {feats_a.shape[-1]} vs {feats_b.shape[-1]}")
    return float(frechet_from_stats(gaussian_stats(feats_a), gaussian_stats(feats_b)))


# Up to this many entries per kernel matrix, KID evaluates the kernels on the full sets once and
# slices subsets out of them: three matrix products instead of three per subset.
KID_FULL_KERNEL_MAX_ENTRIES = 2**25


def kid(
    feats_a: Tensor, feats_b: Tensor, subset_size: int = 1000, num_subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std over random subsets of the unbiased polynomial-kernel MMD^2.

    Uses torchmetrics' ``poly_kernel`` (k(x, y) = (x.y / D + 1)^3, the KID definition) and
    ``maximum_mean_discrepancy`` with our own seeded subset draws. `subset_size` is clamped to the
    smaller set so small runs still get a value; the std is the population std over subsets, as in
    torchmetrics.
    """
    a, b = _as_float64_2d(feats_a), _as_float64_2d(feats_b)
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 rows in each feature set")
    g = torch.Generator().manual_seed(seed)
    draws = [
        (torch.randperm(a.shape[0], generator=g)[:m], torch.randperm(b.shape[0], generator=g)[:m])
        for _ in range(num_subsets)
    ]
    if max(a.shape[0], b.shape[0]) ** 2 <= KID_FULL_KERNEL_MAX_ENTRIES:
        k_aa, k_ab, k_bb = poly_kernel(a, a), poly_kernel(a, b), poly_kernel(b, b)
        vals = [maximum_mean_discrepancy(k_aa[ia][:, ia], k_ab[ia][:, ib], k_bb[ib][:, ib]) for ia, ib in draws]
    else:
        vals = [poly_mmd(a[ia], b[ib]) for ia, ib in draws]
    v = torch.stack(vals)
    return float(v.mean()), float(v.std(unbiased=False))
