"""Fused activation fake-quant for CUDA (Triton, JIT-compiled: no build step).

At run time the only per-call quantization work is on activations. The reference code in
`primitives.fake_quant_act` needs about ten full-tensor passes in float32 plus as many kernel
launches; these kernels read X once and write X' (for the low-rank branch) and Q(X') once,
which is what keeps a fake-quant step within ~2x of an FP16 step. They compute the same
numbers as the reference, bit for bit, by doing its roundings in its order:
  - X' = (X + shift) * lambda^-1 is two tensors of X's dtype there: the sum is rounded to that
    dtype, then the product (each computed in float32, as PyTorch does for 16-bit tensors; the
    shifts, select.ACT_LOWER_BOUNDS, are exact in 16 bit);
  - division by a tensor is IEEE-correct in PyTorch: here `div_rn` (Triton's `/` on float32 is
    an approximate division);
  - division by a constant is a product with its float32 reciprocal (`primitives.div_const`);
  - round-half-even, E4M3 / E2M1 grids, the same clamps.
Rounding X' once and dividing approximately changed 0.003-2.4 % of the float16 codes and up to
20 % of the bfloat16 ones on an H200 (unsigned INT8 after smoothing the worst).

Used only on CUDA with a contiguous input; everything else falls back to the reference.
"""
from __future__ import annotations

import torch

from .primitives import E2M1_MAX, E4M3_MAX
from .spec import QuantizerSpec

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

_BLOCK_M = 32       # rows (tokens) per program
_MIN_COLS = 128     # columns per program, at least: 16-wide NVFP4 groups alone would read 32-byte row pieces
_BLOCK_FLAT = 2048  # elements per program of the per-tensor kernel

if triton is not None:

    @triton.jit
    def _rint(v):
        """Round half to even (as torch.round) for |v| < 2^22 via the 1.5 * 2^23 trick; larger values
        only occur out of range and are clamped afterwards. Also runs in Triton's CPU interpreter."""
        return (v + 12582912.0) - 12582912.0

    # Both grids divide by powers of two: a product with the reciprocal (a power of two too) is the
    # exact quotient, bit for bit the reference's division, without div_rn's cost.
    @triton.jit
    def _round_e4m3(s):
        """Round s >= 0 to FP8 E4M3 (saturating at 448): step 2^(e-3), e = max(exponent, -6)."""
        s = tl.minimum(s, 448.0)
        e = ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)
        return _rint(s * inv_step) * step

    @triton.jit
    def _round_e2m1(v):
        a = tl.minimum(tl.abs(v), 6.0)
        step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
        inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
        r = tl.minimum(_rint(a * inv_step) * step, 6.0)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _group_kernel(x_ptr, smooth_ptr, xs_ptr, xq_ptr, ts_ptr, M, C, shift,
                      HAS_SHIFT: tl.constexpr, HAS_SMOOTH: tl.constexpr, WRITE_XS: tl.constexpr,
                      NVFP4: tl.constexpr, UNSIGNED: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                      INV_QMAX: tl.constexpr, INV_E2M1_MAX: tl.constexpr, INV_TS: tl.constexpr,
                      G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = rows[:, None] < M
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        xs = x
        if HAS_SHIFT:    # the reference's X + shift is a tensor of X's dtype: rounded here
            xs = (xs.to(tl.float32) + shift).to(x.dtype)
        if HAS_SMOOTH:   # and so is its product with lambda^-1: rounded again
            xs = (xs.to(tl.float32) * tl.load(smooth_ptr + cols).to(tl.float32)[None, :]).to(x.dtype)
        if WRITE_XS:
            tl.store(xs_ptr + offs, xs, mask=mask)
        # One row per quantization group: a row-major tile's rows split into BLOCK_C // G groups each.
        xs = tl.reshape(xs.to(tl.float32), (BLOCK_M * (BLOCK_C // G), G))
        if NVFP4:
            ts = tl.maximum(tl.load(ts_ptr).to(tl.float32) * INV_TS, 1e-12)   # calibrated max|X'| / (6 * 448)
            s = _round_e4m3(tl.math.div_rn(tl.max(tl.abs(xs), axis=1) * INV_E2M1_MAX, ts))
            eff = tl.maximum(s * ts, 1e-12)[:, None]
            q = _round_e2m1(tl.math.div_rn(xs, eff)) * eff
        else:
            if UNSIGNED:
                amax = tl.max(tl.maximum(xs, 0.0), axis=1)
            else:
                amax = tl.max(tl.abs(xs), axis=1)
            s = tl.where(amax > 0, amax * INV_QMAX, 1.0)[:, None]
            q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(xs, s)), QMIN), QMAX) * s
        tl.store(xq_ptr + offs, tl.reshape(q, (BLOCK_M, BLOCK_C)).to(x.dtype), mask=mask)

    @triton.jit
    def _tensor_kernel(x_ptr, xq_ptr, lo_ptr, hi_ptr, N, QMAX: tl.constexpr, INV_QMAX: tl.constexpr,
                       BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        lo = tl.minimum(tl.load(lo_ptr), 0.0)
        hi = tl.maximum(tl.load(hi_ptr), 0.0)
        s = tl.maximum((hi - lo) * INV_QMAX, 1e-12)
        zp = _rint(tl.math.div_rn(-lo, s))
        q = (tl.minimum(tl.maximum(_rint(tl.math.div_rn(x.to(tl.float32), s)) + zp, 0.0), QMAX) - zp) * s
        tl.store(xq_ptr + offs, q.to(x.dtype), mask=mask)


def supports(x: torch.Tensor, spec: QuantizerSpec) -> bool:
    if triton is None or not x.is_cuda or not x.is_contiguous() or x.dtype not in (torch.float16, torch.bfloat16,
                                                                                   torch.float32):
        return False
    if spec.granularity == "tensor":
        return not spec.dynamic
    g = spec.group_size
    return spec.granularity == "group" and g & (g - 1) == 0 and x.shape[-1] % g == 0


def columns_per_program(c: int, g: int) -> int:
    """Whole groups per program, at least _MIN_COLS columns where they divide the width; else one group."""
    return max(g, _MIN_COLS) if c % max(g, _MIN_COLS) == 0 else g


def group_fake_quant(x: torch.Tensor, spec: QuantizerSpec, shift: float, smooth: torch.Tensor | None,
                     need_xs: bool, hi: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(X', Q(X')) with X' = (X + shift) * smooth, per-token groups; X' is None unless `need_xs`.
    NVFP4: `hi` is the calibrated max |X'| that sets the tensor scale (else measured here)."""
    c = x.shape[-1]
    m = x.numel() // c
    xq = torch.empty_like(x)
    xs = torch.empty_like(x) if need_xs else xq
    if spec.fmt == "nvfp4":
        if hi is None:   # max |X'| of this very tensor, X' as the reference rounds it
            xr = x + shift if shift else x
            hi = (xr * smooth if smooth is not None else xr).abs().amax().float()
        ts = hi.reshape(1)
        qmin, qmax = 0, 1
    else:
        ts = xq  # unused
        qmin, qmax = (0, 2**spec.bits - 1) if shift > 0 else (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1)
    g = spec.group_size
    block_c = columns_per_program(c, g)
    grid = (triton.cdiv(m, _BLOCK_M), c // block_c)
    _group_kernel[grid](
        x, smooth if smooth is not None else x, xs, xq, ts, m, c, float(shift),
        HAS_SHIFT=bool(shift), HAS_SMOOTH=smooth is not None, WRITE_XS=need_xs, NVFP4=spec.fmt == "nvfp4",
        UNSIGNED=shift > 0, QMIN=qmin, QMAX=qmax, INV_QMAX=1.0 / qmax, INV_E2M1_MAX=1.0 / E2M1_MAX,
        INV_TS=1.0 / (E2M1_MAX * E4M3_MAX), G=g, BLOCK_M=_BLOCK_M, BLOCK_C=block_c,
    )
    return (xs if need_xs else None), xq


def tensor_fake_quant(x: torch.Tensor, spec: QuantizerSpec, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Static per-tensor asymmetric fake-quant with the calibrated range [lo, hi]."""
    xq = torch.empty_like(x)
    n = x.numel()
    qmax = 2**spec.bits - 1
    _tensor_kernel[(triton.cdiv(n, _BLOCK_FLAT),)](x, xq, lo, hi, n, QMAX=qmax, INV_QMAX=1.0 / qmax,
                                                    BLOCK=_BLOCK_FLAT)
    return xq
