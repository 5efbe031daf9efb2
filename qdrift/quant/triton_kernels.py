"""Fused activation fake-quant for CUDA (Triton, JIT-compiled: no build step).

At run time the only per-call quantization work is on activations. The reference code in
`primitives.fake_quant_act` needs about ten full-tensor passes in float32 plus as many kernel
launches; these kernels read X once and write X' (for the low-rank branch) and Q(X') once,
which is what keeps a fake-quant step within ~2x of an FP16 step. They compute the same
quantizer as the reference (same scales and rounding: round-half-even, E4M3 / E2M1 grids).

Used only on CUDA with a contiguous input; everything else falls back to the reference.
"""
from __future__ import annotations

import torch

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

    @triton.jit
    def _round_e4m3(s):
        """Round s >= 0 to FP8 E4M3 (saturating at 448): step 2^(e-3), e = max(exponent, -6)."""
        s = tl.minimum(s, 448.0)
        e = ((s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        e = tl.maximum(e, -6)
        step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
        return _rint(s / step) * step

    @triton.jit
    def _round_e2m1(v):
        a = tl.minimum(tl.abs(v), 6.0)
        step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
        r = tl.minimum(_rint(a / step) * step, 6.0)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _group_kernel(x_ptr, smooth_ptr, xs_ptr, xq_ptr, ts_ptr, M, C, shift,
                      HAS_SMOOTH: tl.constexpr, WRITE_XS: tl.constexpr, NVFP4: tl.constexpr,
                      UNSIGNED: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
                      G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = rows[:, None] < M
        offs = rows[:, None] * C + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        xs = x.to(tl.float32) + shift
        if HAS_SMOOTH:
            xs = xs * tl.load(smooth_ptr + cols).to(tl.float32)[None, :]
        xs = xs.to(x.dtype)                       # X' is a tensor of the compute dtype
        if WRITE_XS:
            tl.store(xs_ptr + offs, xs, mask=mask)
        # One row per quantization group: a row-major tile's rows split into BLOCK_C // G groups each.
        xs = tl.reshape(xs.to(tl.float32), (BLOCK_M * (BLOCK_C // G), G))
        if NVFP4:
            ts = tl.maximum(tl.load(ts_ptr).to(tl.float32) / 2688.0, 1e-12)   # calibrated max|X'| / (6 * 448)
            s = _round_e4m3(tl.max(tl.abs(xs), axis=1) / 6.0 / ts)
            eff = tl.maximum(s * ts, 1e-12)[:, None]
            q = _round_e2m1(xs / eff) * eff
        else:
            if UNSIGNED:
                amax = tl.max(tl.maximum(xs, 0.0), axis=1)
            else:
                amax = tl.max(tl.abs(xs), axis=1)
            s = amax / QMAX
            s = tl.where(s > 0, s, 1.0)[:, None]
            q = tl.minimum(tl.maximum(_rint(xs / s), QMIN), QMAX) * s
        tl.store(xq_ptr + offs, tl.reshape(q, (BLOCK_M, BLOCK_C)).to(x.dtype), mask=mask)

    @triton.jit
    def _tensor_kernel(x_ptr, xq_ptr, lo_ptr, hi_ptr, N, QMAX: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        lo = tl.minimum(tl.load(lo_ptr), 0.0)
        hi = tl.maximum(tl.load(hi_ptr), 0.0)
        s = tl.maximum((hi - lo) / QMAX, 1e-12)
        zp = _rint(-lo / s)
        q = (tl.minimum(tl.maximum(_rint(x.to(tl.float32) / s) + zp, 0.0), QMAX) - zp) * s
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
        ts = hi if hi is not None else (x * smooth if smooth is not None else x).abs().amax().float()
        ts = ts.reshape(1)
        qmin, qmax = 0, 0
    else:
        ts = xq  # unused
        unsigned = shift > 0
        qmin, qmax = (0, 2**spec.bits - 1) if unsigned else (-(2 ** (spec.bits - 1)), 2 ** (spec.bits - 1) - 1)
    g = spec.group_size
    block_c = columns_per_program(c, g)
    grid = (triton.cdiv(m, _BLOCK_M), c // block_c)
    _group_kernel[grid](
        x, smooth if smooth is not None else x, xs, xq, ts, m, c, float(shift),
        HAS_SMOOTH=smooth is not None, WRITE_XS=need_xs, NVFP4=spec.fmt == "nvfp4", UNSIGNED=shift > 0,
        QMIN=qmin, QMAX=qmax, G=g, BLOCK_M=_BLOCK_M, BLOCK_C=block_c,
    )
    return (xs if need_xs else None), xq


def tensor_fake_quant(x: torch.Tensor, spec: QuantizerSpec, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Static per-tensor asymmetric fake-quant with the calibrated range [lo, hi]."""
    xq = torch.empty_like(x)
    n = x.numel()
    _tensor_kernel[(triton.cdiv(n, _BLOCK_FLAT),)](x, xq, lo, hi, n, QMAX=2**spec.bits - 1, BLOCK=_BLOCK_FLAT)
    return xq
