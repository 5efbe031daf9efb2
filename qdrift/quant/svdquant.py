"""SVDQuant (Li et al., 2024): smoothing + 16-bit low-rank branch + 4-bit residual.

Per linear layer with calibration inputs X and weight W:
  1. smoothing  X' = X diag(lambda)^-1, W' = W diag(lambda), lambda_j = max|X_j|^alpha / max|W_:,j|^beta,
     (alpha, beta) from the grid {(0,0)} + {(k/n, 0)} + {(k/n, 1 - k/n)}, k = 1..n-1, minimising the
     quantized layer's output error on the calibration sample (the low-rank branch included, from a
     seeded randomized SVD so that 2n candidates stay cheap);
  2. low-rank   U V = top-r SVD of W' (exact), then refined: U V <- top-r of W' - Q(W' - U V)
     (warm-started randomized range finder), keeping the best by output error and stopping when
     it gets worse;
  3. residual   R = W' - U V quantized (groups of 64, 16-bit scales; or NVFP4), activations X'
     fake-quantized per token at run time (unsigned after a shift for post-GELU/SiLU inputs; for
     NVFP4 the activation tensor scale is static, from the calibrated max |X'|).
Resnet convolutions (U-Nets) get plain group quantization; FLUX's adaLN linears 4-bit weights only.
All layers are calibrated on the FP model's activations in one pass; each layer then is quantized
on its own (its bounded token sample is freed as soon as it is done).
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from qdrift.progress import progress as progress_bar

from .layers import FakeQuantLayer, replace_module
from .lowrank import randomized_lowrank, top_svd
from .observers import InputObserver, observing
from .primitives import fake_quant_act, fake_quant_rows, quantize_weight
from .report import layer_line
from .select import LayerSite
from .spec import QuantizerSpec, QuantSpec

log = logging.getLogger(__name__)

# Part of the quantized state's cache key: bump when a change alters the quantized state (here or in
# the primitives, layers and helpers this pass calls).
# 2: a constant divides as a product with its float32 reciprocal on every device (primitives.div_const).
# 3: the token sample is drawn on the input's device (CUDA priorities differ from the CPU ones).
ALGORITHM_VERSION = 3

# FLUX's weight-only adaLN linears: SVDQuant uses 4-bit integer weights in groups of 64 (also under NVFP4).
WEIGHT_ONLY_SPEC = QuantizerSpec(4, "int", "group", 64)


@dataclass(frozen=True)
class LinearProblem:
    """One layer's data for the searches, all float32 on the compute device."""

    x: torch.Tensor        # (T, C) calibration inputs, already shifted (X + s)
    w: torch.Tensor        # (O, C)
    y: torch.Tensor        # (T, O) reference output X W^T
    x_span: torch.Tensor   # max |X_j + s| over all calibration tokens
    w_span: torch.Tensor   # max |W_:,j|
    dtype: torch.dtype     # compute dtype: smoothing factors are rounded to it
    unsigned: bool

    def inv_lambda(self, alpha: float, beta: float) -> torch.Tensor:
        lam = self.x_span.pow(alpha) / self.w_span.pow(beta)
        lam = lam / (lam.max() * lam.min()).sqrt()        # centre around 1: keeps X', W' in 16-bit range
        return (1.0 / lam).to(self.dtype).to(torch.float32)

    def act_max(self, inv: torch.Tensor) -> torch.Tensor:
        """max |X'| over all calibration tokens, per candidate: NVFP4's static activation tensor scale."""
        return (self.x_span * inv).amax(-1)

    def errors(self, inv: torch.Tensor, u: torch.Tensor | None, v: torch.Tensor | None, qres: torch.Tensor,
               aspec: QuantizerSpec) -> torch.Tensor:
        """||Y - (Q(X') Q(R)^T + X' V^T U^T)||^2 per candidate; inv (K, C), u/v/qres batched over K."""
        xs = self.x * inv[:, None, :]
        hi = self.act_max(inv).reshape(-1, 1, 1, 1) if aspec.fmt == "nvfp4" else None
        yq = fake_quant_act(xs, aspec, self.unsigned, hi=hi, batched=True) @ qres.transpose(-1, -2)
        if u is not None:
            yq = yq + (xs @ v.transpose(-1, -2)) @ u.transpose(-1, -2)
        return (self.y - yq).pow(2).sum((-2, -1))


def alpha_beta_grid(n: int) -> list[tuple[float, float]]:
    ks = [k / n for k in range(1, n)]
    return [(0.0, 0.0)] + [(a, 0.0) for a in ks] + [(a, (n - k) / n) for k, a in enumerate(ks, 1)]


def _generator(seed: int, name: str) -> torch.Generator:
    # drawn on the host and moved: the same stream on every device
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _chunk(p: LinearProblem, budget_bytes: float = 2**31) -> int:
    """Candidates evaluated at once: each holds a few float32 copies of W', X' and Y."""
    per = 4 * (3 * p.w.numel() + 6 * p.x.numel() + 2 * p.y.numel())
    return max(1, int(budget_bytes // per))


def search_smoothing(p: LinearProblem, spec: QuantSpec, name: str) -> tuple[float, float, torch.Tensor]:
    """Grid search of (alpha, beta) by output error, candidates batched; returns the best and lambda^-1."""
    rank = spec.svdquant.rank
    grid = alpha_beta_grid(spec.svdquant.alpha_grid)
    invs = torch.stack([p.inv_lambda(a, b) for a, b in grid])
    errs = []
    step = _chunk(p)
    for i in range(0, len(grid), step):
        inv = invs[i:i + step]
        ws = p.w / inv[:, None, :]
        u = v = None
        if rank:
            u, v = randomized_lowrank(ws, rank, _generator(spec.seed, name))
            ws = ws - u @ v
        errs.append(p.errors(inv, u, v, fake_quant_rows(ws, spec.weights), spec.acts))
        del ws
    best = int(torch.cat(errs).argmin())   # first minimum: ties go to the weaker smoothing
    return grid[best][0], grid[best][1], invs[best]


def refine_lowrank(p: LinearProblem, inv: torch.Tensor, spec: QuantSpec, name: str
                   ) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Exact top-r SVD of W', then U V <- top-r of W' - Q(W' - U V) while the output error decreases.

    The refinement steps use the warm-started randomized range finder: an exact SVD per step
    would dominate quantization time on large layers for the same subspace.
    """
    ws = p.w / inv
    rank = spec.svdquant.rank

    def evaluate(u, v):
        qres = fake_quant_rows(ws - u @ v, spec.weights)
        return qres, p.errors(inv[None], u[None], v[None], qres[None], spec.acts).item()

    u, v = top_svd(ws, rank)
    qres, err = evaluate(u, v)
    best = (err, u, v, 0)
    gen = _generator(spec.seed + 1, name)
    for it in range(1, spec.svdquant.lowrank_iters + 1):
        u, v = randomized_lowrank(ws - qres, rank, gen, power_iters=2, init=v)
        qres, err = evaluate(u, v)
        if err >= best[0]:
            break
        best = (err, u, v, it)
    err, u, v, iters = best
    return u, v, iters, err


def svdquant_linear(orig: nn.Linear | nn.Conv2d, kind: str, x: torch.Tensor, x_min: torch.Tensor,
                    x_max: torch.Tensor, spec: QuantSpec, shift: float = 0.0, name: str = ""
                    ) -> tuple[FakeQuantLayer, dict]:
    """Quantize one linear (or 1x1 conv) layer from its calibration sample `x` (T, C, raw inputs)."""
    w0 = orig.weight.detach()
    dev = w0.device
    w = w0.reshape(w0.shape[0], -1).to(torch.float32)
    xf = x.to(dev, torch.float32) + shift
    p = LinearProblem(
        x=xf, w=w, y=xf @ w.t(),
        x_span=torch.maximum((x_max.to(dev) + shift).abs(), (x_min.to(dev) + shift).abs()).clamp_min(1e-6),
        w_span=w.abs().amax(0).clamp_min(1e-6), dtype=w0.dtype, unsigned=shift > 0,
    )
    alpha, beta, inv = search_smoothing(p, spec, name)
    ref = p.y.pow(2).sum().clamp_min(1e-30).item()
    if spec.svdquant.rank:
        u, v, iters, err = refine_lowrank(p, inv, spec, name)
        qw = quantize_weight(p.w / inv - u @ v, spec.weights)
        lowrank = (v, u)
    else:
        iters, lowrank = 0, None
        qw = quantize_weight(p.w / inv, spec.weights)
        err = p.errors(inv[None], None, None, fake_quant_rows(p.w / inv, spec.weights)[None], spec.acts).item()
    act_range = None
    if spec.acts.fmt == "nvfp4":
        hi = p.act_max(inv).to(inv.dtype)
        act_range = (-hi, hi)
    layer = FakeQuantLayer(orig, kind, qw, spec.acts, smooth=inv, lowrank=lowrank, act_shift=shift,
                           act_range=act_range)
    return layer, dict(alpha=alpha, beta=beta, lowrank_iters=iters, rel_error=err / ref)


def act_shift_for(site: LayerSite, aspec: QuantizerSpec) -> float:
    """Unsigned integer activations after shifting inputs bounded below (not for FP4, which is signed)."""
    return -site.act_lower_bound if site.act_lower_bound is not None and aspec.fmt == "int" else 0.0


def check_rank(model: nn.Module, sites: list[LayerSite], rank: int) -> None:
    """A branch of rank >= min(in, out) holds the whole weight: nothing would be quantized (zero error)."""
    for s in sites:
        w = model.get_submodule(s.name).weight
        width = min(w.shape[0], w[0].numel())
        if rank and rank >= width:
            raise ValueError(f"SVDQuant rank {rank} >= width {width} of layer {s.name} ({w[0].numel()} in, "
                             f"{w.shape[0]} out): the 16-bit branch would hold the whole weight; set quant.rank=N "
                             f"with N < {width}, or the model's svdquant_rank")


def run_svdquant(model: nn.Module, sites: list[LayerSite], spec: QuantSpec, calibrate, records: dict,
                 progress: bool) -> None:
    svd = spec.svdquant
    searched = [s for s in sites if s.role == "quant" and s.kind != "conv"]
    check_rank(model, searched, svd.rank)   # before the calibration run, not after it
    act_only = [s for s in sites if s.role == "quant" and s.kind == "conv"]
    observers = {s.name: InputObserver(svd.calib_tokens, seed=spec.seed, name=s.name) for s in searched}
    with observing(model, observers):
        calibrate(spec.calib_prompts)

    todo = searched + act_only + [s for s in sites if s.role == "weight_only"]
    for s in progress_bar(todo, desc=f"{spec.name}: quantizing", nested=True, disable=not progress):
        orig = model.get_submodule(s.name)
        rec = records[s.name]
        if s.role == "weight_only":
            layer = FakeQuantLayer(orig, s.kind, quantize_weight(orig.weight, WEIGHT_ONLY_SPEC), None)
            rec.w_bits, rec.w_fmt, rec.w_group = 4, "int", 64
        elif s.kind == "conv":   # resnet convs: plain group quantization (no smoothing / branch)
            shift = act_shift_for(s, spec.acts)
            layer = FakeQuantLayer(orig, s.kind, quantize_weight(orig.weight, spec.weights), spec.acts,
                                   act_shift=shift)
            rec.w_bits, rec.a_bits = spec.weights.bits, spec.acts.bits
        else:
            obs = observers.pop(s.name)
            if obs.sample is None:
                rec.note = "not called during calibration: kept 16-bit"
                log.warning("%s saw no calibration inputs; kept in 16 bit", s.name)
                continue
            layer, info = svdquant_linear(orig, s.kind, obs.sample, obs.ch_min, obs.ch_max, spec,
                                          act_shift_for(s, spec.acts), s.name)
            del obs
            rec.w_bits, rec.a_bits, rec.rank = spec.weights.bits, spec.acts.bits, svd.rank
            rec.alpha, rec.beta = info["alpha"], info["beta"]
            rec.lowrank_iters, rec.rel_error = info["lowrank_iters"], info["rel_error"]
        if s.role != "weight_only":
            rec.w_fmt, rec.w_granularity, rec.w_group = spec.weights.fmt, "group", spec.weights.group_size
        replace_module(model, s.name, layer)
        log.info(layer_line(rec))
