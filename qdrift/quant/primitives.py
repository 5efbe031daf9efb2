"""Quantize-dequantize primitives (simulated quantization).

Weights are quantized once into (codes, scales) and dequantized with `dequantize_weight`; the
same function runs at quantize time and when a saved state is loaded, so both give bit-identical
weights. Activations are fake-quantized on every call by `fake_quant_act`, vectorised over
groups (reshape + amax + round, no Python loop over groups).

Division by a constant is written `div_const(a, d)` = a * float32(1/d), never `a / d`: for a Python
number d PyTorch's CUDA kernels compute that product while its CPU kernels divide, so `a / d` could
give other codes on another device. Divisions by tensors (x / scale) are IEEE-correctly rounded on
every device, and the Triton kernels mirror both (`div_rn`, the same reciprocal constants).

Conventions: the quantized ("reduction") dimension is the last one. A weight of a Linear is
(out, in); a Conv2d weight is brought to (out, kh, kw, in) before grouping so that groups run
along input channels, as the kernels of SVDQuant do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spec import QuantizerSpec

E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)   # magnitudes representable in FP4 E2M1
E2M1_MAX = 6.0
E4M3_MAX = 448.0
_TINY = 1e-12


def div_const(a: torch.Tensor, d: float) -> torch.Tensor:
    """a / d for a constant d as a * float32(1/d) on every device (PyTorch's CUDA kernels compute `a / d`
    so; its CPU kernels divide)."""
    return a * (1.0 / d)


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


# ------------------------------------------------------------------------------------------ groups
def _grouped(x: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """(..., C) -> (..., C/g, g), zero-padding C up to a multiple of g (zeros do not move amax)."""
    c = x.shape[-1]
    g = min(group, c)
    pad = (-c) % g
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (x.shape[-1] // g, g)), c


def _ungrouped(x: torch.Tensor, c: int) -> torch.Tensor:
    return x.flatten(-2)[..., :c]


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Round to the nearest FP4 E2M1 value (saturating at +-6): step 0.5 below 2, 1 below 4, else 2."""
    a = v.abs().clamp(max=E2M1_MAX)
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.sign(v) * (torch.round(a / step) * step).clamp(max=E2M1_MAX)


def round_e4m3(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales to FP8 E4M3 (saturating at 448)."""
    return s.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


def _fp16_scale(s: torch.Tensor, amax: torch.Tensor, qmax: int) -> torch.Tensor:
    """16-bit scale that still covers amax (rounding down would clip the extreme value)."""
    s16 = s.to(torch.float16)
    short = s16.to(torch.float32) * qmax < amax
    s16 = torch.where(short, torch.nextafter(s16, torch.full_like(s16, math.inf)), s16)
    return s16.to(torch.float32)


# ------------------------------------------------------------------------------------------ weights
@dataclass
class QuantizedWeight:
    """Integer/FP4 codes and the scales that map them back: w ~ codes * scale (* tensor_scale)."""

    codes: torch.Tensor               # int8: integer levels, or 2x the E2M1 value for nvfp4
    scale: torch.Tensor               # float32 per group/channel (already rounded to its storage type)
    tensor_scale: torch.Tensor | None  # nvfp4 only: float32 per-tensor scale
    spec: QuantizerSpec
    shape: tuple[int, ...]            # original weight shape


def weight_rows(w: torch.Tensor) -> torch.Tensor:
    """(out, in) for Linear; (out, kh, kw, in) for Conv2d: groups run along input channels."""
    return w if w.dim() == 2 else w.permute(0, 2, 3, 1)


def _restore_layout(w: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return w if len(shape) == 2 else w.permute(0, 3, 1, 2)


def _group_codes(g: torch.Tensor, spec: QuantizerSpec, ts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes and scales of groups g (..., n, size); ts: NVFP4 tensor scale (broadcastable)."""
    if spec.fmt == "nvfp4":
        s = round_e4m3(div_const(g.abs().amax(-1, keepdim=True), E2M1_MAX) / ts)
        return round_e2m1(g / (s * ts).clamp_min(_TINY)) * 2, s
    qmin, qmax = int_range(spec.bits, signed=True)
    amax = g.abs().amax(-1, keepdim=True)
    s = div_const(amax, qmax)
    s = _fp16_scale(s, amax, qmax) if spec.granularity == "group" else s
    s = torch.where(s > 0, s, torch.ones_like(s))
    return torch.clamp(torch.round(g / s), qmin, qmax), s


def _dequant(codes: torch.Tensor, s: torch.Tensor, ts: torch.Tensor | None) -> torch.Tensor:
    return codes * 0.5 * (s * ts) if ts is not None else codes * s


def _nvfp4_tensor_scale(x: torch.Tensor, dims) -> torch.Tensor:
    return div_const(x.abs().amax(dims, keepdim=True), E2M1_MAX * E4M3_MAX).clamp_min(_TINY)


def _weight_groups(x: torch.Tensor, spec: QuantizerSpec) -> tuple[torch.Tensor, int]:
    if spec.granularity == "group":
        return _grouped(x, spec.group_size)
    if spec.granularity == "channel":
        return x.reshape(x.shape[0], 1, -1), x[0].numel()
    raise ValueError(f"weights cannot be quantized per {spec.granularity}")


def quantize_weight(w: torch.Tensor, spec: QuantizerSpec) -> QuantizedWeight:
    """Quantize a Linear/Conv2d weight (symmetric) into codes and scales, in float32."""
    x = weight_rows(w.detach().to(torch.float32))
    g, _ = _weight_groups(x, spec)
    ts = _nvfp4_tensor_scale(x, tuple(range(x.dim()))).reshape(1) if spec.fmt == "nvfp4" else None
    codes, s = _group_codes(g, spec, ts)
    return QuantizedWeight(codes.to(torch.int8), s, ts, spec, tuple(w.shape))


def dequantize_weight(q: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """codes * scale back in the original layout (float32, or `dtype`)."""
    v = _dequant(q.codes.to(torch.float32), q.scale, q.tensor_scale)
    rows = weight_rows(torch.empty(q.shape, device="meta"))
    v = v.reshape(rows.shape) if q.spec.granularity == "channel" else _ungrouped(v, rows.shape[-1])
    v = _restore_layout(v, q.shape)
    return v if dtype is None else v.to(dtype)


def fake_quant_weight(w: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Quantize-dequantize in float32."""
    return dequantize_weight(quantize_weight(w, spec))


def fake_quant_rows(w: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Batched `fake_quant_weight` for (..., out, in) float32 matrices (the searches' candidates);
    per matrix the same numbers as `fake_quant_weight`."""
    g, c = _grouped(w, spec.group_size) if spec.granularity == "group" else (w.unsqueeze(-2), w.shape[-1])
    ts = _nvfp4_tensor_scale(w, (-2, -1)).unsqueeze(-1) if spec.fmt == "nvfp4" else None
    codes, s = _group_codes(g, spec, ts)
    v = _dequant(codes, s, ts)
    return v.flatten(-2)[..., :c] if spec.granularity == "group" else v.squeeze(-2)


# ------------------------------------------------------------------------------------------ activations
def fake_quant_act(
    x: torch.Tensor, spec: QuantizerSpec, unsigned: bool = False,
    lo: torch.Tensor | None = None, hi: torch.Tensor | None = None, batched: bool = False,
) -> torch.Tensor:
    """Fake-quantize activations along the last (channel) dimension; returns x's dtype.

    dynamic group (SVDQuant): per token, groups of `group_size` channels, symmetric signed, or
        unsigned for inputs already shifted to be >= 0 (post-GELU/SiLU; negatives clip to 0).
    tensor (MixDQ/RTN): one asymmetric range [lo, hi] calibrated offline (static) or taken from
        the tensor itself (dynamic).
    nvfp4 group: E4M3 scale per 16 channels times one FP32 tensor scale, from `hi` = the calibrated
        max |X'| when given (static, as deployed NVFP4 kernels do: no global reduction per call),
        else from the tensor itself.
    batched: dim 0 indexes independent tensors (search candidates): per-tensor statistics per index
        (a static `hi` must then broadcast against (K, ..., groups, 16)).
    """
    xf = x.to(torch.float32)
    if spec.granularity == "tensor":
        if spec.dynamic or lo is None:
            dims = tuple(range(1 if batched else 0, xf.dim()))
            lo, hi = xf.amin(dims, keepdim=batched), xf.amax(dims, keepdim=batched)
        qmin, qmax = int_range(spec.bits, signed=False)
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)   # keep 0 exactly representable
        s = div_const(hi - lo, qmax).clamp_min(_TINY)
        zp = torch.round(-lo / s)
        q = (torch.clamp(torch.round(xf / s) + zp, qmin, qmax) - zp) * s
        return q.to(x.dtype)
    g, c = _grouped(xf, spec.group_size)
    if spec.fmt == "nvfp4":
        if hi is None:
            ts = _nvfp4_tensor_scale(g, tuple(range(1 if batched else 0, g.dim())))
        else:
            ts = div_const(hi.to(torch.float32), E2M1_MAX * E4M3_MAX).clamp_min(_TINY)
        s = round_e4m3(div_const(g.abs().amax(-1, keepdim=True), E2M1_MAX) / ts)
        eff = (s * ts).clamp_min(_TINY)
        q = round_e2m1(g / eff) * eff
    else:
        qmin, qmax = int_range(spec.bits, signed=not unsigned)
        amax = g.clamp_min(0).amax(-1, keepdim=True) if unsigned else g.abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, div_const(amax, qmax), torch.ones_like(amax))
        q = torch.clamp(torch.round(g / s), qmin, qmax) * s
    return _ungrouped(q, c).to(x.dtype)
