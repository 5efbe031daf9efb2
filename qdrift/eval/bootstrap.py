"""Bootstrap confidence intervals: the paired FID change between two variants, and per-image means.

Rows of the variant feature sets are aligned by prompt index, so one resample of prompt indices
is applied to the baseline, the corrected variant and (when aligned too) the reference. The
pairing cancels the prompt-to-prompt variation both variants share, which is what makes a small
FID change detectable. Resamples are represented by per-index counts and the covariance of a
resample is computed from weighted moments (no copies of the feature arrays). Two routes:
more rows than dimensions -> chunks of resamples go through batched Cholesky/eigvalsh of D x D
covariances;
otherwise (e.g. 2048-d Inception features, 1000 prompts) each resample is a k x k problem (k = rows
drawn) built from cross-Gram matrices precomputed once, so its cost does not grow with D.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from qdrift.eval.fid import frechet_from_stats, gaussian_stats, weighted_moments
from qdrift.progress import progress as progress_bar


def _percentile_ci(samples: Tensor, ci: float) -> tuple[float, float]:
    alpha = (1.0 - ci) / 2.0
    q = torch.quantile(samples.to(torch.float64), torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(q[0]), float(q[1])


def _resample_counts(n: int, num: int, g: torch.Generator) -> Tensor:
    """(num, n) multiplicities of indices 0..n-1, each row one draw of n indices with replacement."""
    idx = torch.randint(0, n, (num, n), generator=g)
    return torch.zeros(num, n, dtype=torch.int64).scatter_add_(1, idx, torch.ones_like(idx))


def _chunk_size(num_rows: int, dim: int, budget_bytes: int = 256 * 2**20) -> int:
    """Resamples per batch in the batched route: its (B, D, N) and (B, D, D) float64 buffers fit the budget."""
    return max(1, budget_bytes // (8 * dim * (num_rows + 8 * dim)))


@dataclass(frozen=True)
class _Rows:
    """One weighted resample of a set, kept as row indices into the full set (D > N route)."""

    idx: Tensor  # rows drawn at least once
    rows: Tensor  # feats[idx]
    w: Tensor  # their counts
    n: Tensor  # total count
    mean: Tensor
    trace: Tensor  # trace of the unbiased covariance


def _rows(feats: Tensor, counts: Tensor) -> _Rows:
    idx = counts.nonzero().squeeze(1)
    rows, w = feats[idx], counts[idx].to(torch.float64)
    n = w.sum()
    mean = (w @ rows) / n
    return _Rows(idx, rows, w, n, mean, (w * (rows - mean).square().sum(1)).sum() / (n - 1))


def _frechet_rows(a: _Rows, b: _Rows, gram_ab: Tensor) -> Tensor:
    """FID of two resamples from the full sets' cross-Gram ``gram_ab = A @ B.T``.

    Same nuclear-norm identity as `frechet_from_stats`, but the centred cross products of the drawn
    rows come from `gram_ab` minus mean corrections, so no (k x D) @ (D x k) product per resample.
    """
    cross = (
        gram_ab[a.idx.unsqueeze(1), b.idx.unsqueeze(0)]
        - (a.rows @ b.mean).unsqueeze(1)
        - (b.rows @ a.mean).unsqueeze(0)
        + a.mean @ b.mean
    )
    m = cross * torch.sqrt(a.w / (a.n - 1)).unsqueeze(1) * torch.sqrt(b.w / (b.n - 1)).unsqueeze(0)
    return (a.mean - b.mean).square().sum() + a.trace + b.trace - 2.0 * torch.linalg.svdvals(m).sum()


def _psd_factor(cov: Tensor) -> Tensor:
    """L with L @ L.mT = cov for a batch of PSD matrices: Cholesky, or an eigen-factor where it fails
    (singular covariances, e.g. a constant feature)."""
    chol, info = torch.linalg.cholesky_ex(cov)
    bad = info != 0
    if bool(bad.any()):
        evals, evecs = torch.linalg.eigh(cov[bad])
        chol[bad] = evecs * evals.clamp(min=0).sqrt().unsqueeze(-2)
    return chol


def _frechet_moments(mean: Tensor, cov: Tensor, mean_r: Tensor, cov_r: Tensor, factor_r: Tensor) -> Tensor:
    """Batched FID from moments, for many D x D problems: the eigenvalues of S S_r are those of the
    symmetric L^T S L (S_r = L L^T), so one Cholesky per reference resample and one `eigvalsh` per
    variant replace the eigen/singular-value decompositions with vectors of `frechet_from_stats`."""
    evals = torch.linalg.eigvalsh(factor_r.mT @ cov @ factor_r)
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1) + cov_r.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (mean - mean_r).square().sum(-1) + trace - 2.0 * evals.clamp(min=0).sqrt().sum(-1)


def _chunk_deltas(
    x: Tensor, y: Tensor, r: Tensor, counts: Tensor, counts_r: Tensor, grams: tuple[Tensor, Tensor] | None
) -> Tensor:
    """FID(y*, r*) - FID(x*, r*) for each resample (row) of `counts` / `counts_r`."""
    if grams is None:  # every set has more rows than dimensions: batched D x D linear algebra
        (mx, sx), (my, sy), (mr, sr) = (weighted_moments(f, c) for f, c in ((x, counts), (y, counts), (r, counts_r)))
        lr = _psd_factor(sr)
        return _frechet_moments(my, sy, mr, sr, lr) - _frechet_moments(mx, sx, mr, sr, lr)
    gram_xr, gram_yr = grams
    out = torch.empty(counts.shape[0], dtype=torch.float64)
    for b in range(counts.shape[0]):  # D >= N: per-resample (k x k) problems from the cross-Grams
        rr = _rows(r, counts_r[b])
        out[b] = _frechet_rows(_rows(y, counts[b]), rr, gram_yr) - _frechet_rows(_rows(x, counts[b]), rr, gram_xr)
    return out


def paired_bootstrap_fid_delta(
    feats_x: Tensor,
    feats_y: Tensor,
    feats_ref: Tensor,
    num_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Paired bootstrap of FID(y, ref) - FID(x, ref); negative means y (e.g. corrected) beats x (baseline).

    `feats_x` and `feats_y` have one row per prompt index, in the same order. If `feats_ref` has
    that many rows too it is taken to be aligned with them (e.g. reference images of the same
    prompts) and gets the same index resample; otherwise the reference set is resampled
    independently with its own indices (a separate, unpaired sample of the target distribution).
    A reference with as many rows is assumed aligned; for an unrelated one of the same size, the
    shared draw only couples the resamples through an arbitrary pairing of rows (a small effect).

    Returns ``delta`` (on the full sets), percentile ``ci_low``/``ci_high``, ``p_below_zero``
    (fraction of resamples with delta < 0) and ``num_resamples``. `device` may be a GPU: the cost
    is a few eigen/singular-value decompositions per resample.
    """
    if feats_x.shape != feats_y.shape:
        raise ValueError(
            f"x and y features must be aligned row by row: {tuple(feats_x.shape)} vs {tuple(feats_y.shape)}"
        )
    if feats_ref.shape[1] != feats_x.shape[1]:
        raise ValueError(f"feature dims differ: {feats_x.shape[1]} vs reference {feats_ref.shape[1]}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    x, y, r = (f.to(device=device, dtype=torch.float64) for f in (feats_x, feats_y, feats_ref))
    n, m, d = x.shape[0], r.shape[0], x.shape[1]

    stats_r = gaussian_stats(r)
    delta = float(frechet_from_stats(gaussian_stats(y), stats_r) - frechet_from_stats(gaussian_stats(x), stats_r))

    grams = None
    if min(n, m) <= d:
        shift = r.mean(0)  # FID is shift-invariant; centring keeps the Gram corrections free of cancellation
        x, y, r = x - shift, y - shift, r - shift
        grams = (x @ r.T, y @ r.T)

    g = torch.Generator().manual_seed(seed)
    chunk = _chunk_size(max(n, m), d)
    deltas = []
    # Nested: it runs inside the evaluate stage, whose start and end are logged.
    with progress_bar(total=num_resamples, desc="bootstrap FID delta", unit="resample", nested=True,
                      disable=not progress) as bar:
        for start in range(0, num_resamples, chunk):
            num = min(chunk, num_resamples - start)
            counts = _resample_counts(n, num, g)
            counts_r = counts if m == n else _resample_counts(m, num, g)
            deltas.append(_chunk_deltas(x, y, r, counts.to(device), counts_r.to(device), grams).cpu())
            bar.update(num)
    deltas = torch.cat(deltas)
    lo, hi = _percentile_ci(deltas, ci)
    return {
        "delta": delta,
        "ci_low": lo,
        "ci_high": hi,
        "p_below_zero": float((deltas < 0).to(torch.float64).mean()),
        "num_resamples": float(num_resamples),
    }


def bootstrap_mean_ci(
    values: Tensor, num_resamples: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict[str, float]:
    """Mean of per-image values (CLIP score, PSNR, ...) with a percentile bootstrap CI over images."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0 or num_resamples < 1:
        raise ValueError(f"need values and num_resamples >= 1 (got {v.numel()} values, {num_resamples} resamples)")
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, 2**22 // v.numel())  # resamples per vectorised draw (bounded index memory)
    means = torch.cat(
        [
            v[torch.randint(0, v.numel(), (min(chunk, num_resamples - start), v.numel()), generator=g)].mean(1)
            for start in range(0, num_resamples, chunk)
        ]
    )
    lo, hi = _percentile_ci(means, ci)
    return {"mean": float(v.mean()), "ci_low": lo, "ci_high": hi}


if __name__ == "__main__":  # timing: python -m qdrift.eval.bootstrap [D] [N] [resamples]
    import sys

    d, n, b = (int(a) for a in (sys.argv[1:4] + ["2048", "1000", "100"][len(sys.argv[1:4]) :]))
    gen = torch.Generator().manual_seed(0)
    fx, fy, fr = (torch.randn(n, d, generator=gen) + s for s in (0.2, 0.1, 0.0))
    t0 = time.perf_counter()
    out = paired_bootstrap_fid_delta(fx, fy, fr, num_resamples=b, progress=True)
    print(f"D={d} N={n} resamples={b}: {time.perf_counter() - t0:.1f}s  {out}")
