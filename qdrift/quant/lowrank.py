"""Rank-r factorisations W ~ U V (U: out x r, V: r x in) for SVDQuant's 16-bit branch."""
from __future__ import annotations

import torch


def top_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact truncated SVD: U = U_r S_r, V = V_r^T (float32)."""
    u, s, vh = torch.linalg.svd(w.to(torch.float32), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def randomized_lowrank(w: torch.Tensor, rank: int, generator: torch.Generator, oversample: int = 8,
                       power_iters: int = 1, init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate best rank-r factors of w (..., out, in) by a seeded randomized range finder.

    Batched over leading dims (the smoothing grid's candidates) and cheap: a few matmuls, one
    thin QR and an eigendecomposition of a (r + oversample)^2 matrix instead of a full SVD.
    `init` (r' x in) warm-starts the range finder from a previous right subspace (refinement).
    Returns U (..., out, r), V (..., r, in) with U V = Q Ub Ub^T Q^T w (Q: range basis, Ub: top
    eigenvectors of B B^T, B = Q^T w): the rank-r truncation of w projected on the found range.
    """
    w = w.to(torch.float32)
    k = min(rank + oversample, w.shape[-1], w.shape[-2])
    omega = torch.randn(w.shape[-1], k, generator=generator).to(w.device)
    if init is not None:
        omega[:, : init.shape[0]] = init.t()
    wt = w.transpose(-1, -2)
    q = torch.linalg.qr(w @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(w @ torch.linalg.qr(wt @ q).Q).Q
    b = q.transpose(-1, -2) @ w
    gram = (b @ b.transpose(-1, -2)).to("cpu", torch.float64)       # tiny: solved on the host, exactly
    _, vecs = torch.linalg.eigh(gram)
    ub = vecs[..., -rank:].flip(-1).to(w.device, torch.float32)       # top-r eigenvectors, largest first
    return q @ ub, ub.transpose(-1, -2) @ b
