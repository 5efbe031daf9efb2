"""The fake-quant twin of one Linear/Conv2d, and the passes that install and undo it.

`FakeQuantLayer` computes, for an input X of a layer with weight W (SVDQuant notation):

    X' = (X + shift) * diag(lambda)^-1        smoothing (lambda = 1 and shift = 0 when unused)
    Y  = Q_a(X') Q_w(R)^T + (X' V^T) U^T + b'  R = W diag(lambda) - U V, the 16-bit rank-r branch U V

with Q_w(R) precomputed once (stored dequantized in the compute dtype) so that at run time only
the activations are fake-quantized. The original module is kept untouched inside the twin:
`quant_enabled(model, False)` routes calls back to it, `dequantize(model)` puts it back.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import triton_kernels
from .primitives import QuantizedWeight, dequantize_weight, fake_quant_act
from .spec import QuantizerSpec


class FakeQuantLayer(nn.Module):
    def __init__(
        self,
        orig: nn.Linear | nn.Conv2d,
        kind: str,
        qweight: QuantizedWeight | None,
        act_spec: QuantizerSpec | None,
        *,
        smooth: torch.Tensor | None = None,      # lambda^-1 per input channel (compute dtype)
        lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,  # (V: r x in, U: out x r)
        act_shift: float = 0.0,
        act_range: tuple[torch.Tensor, torch.Tensor] | None = None,  # static (lo, hi)
        bos_fp: bool = False,                   # first token computed by the original layer
    ) -> None:
        super().__init__()
        if (smooth is not None or lowrank is not None) and kind == "conv":
            raise ValueError("smoothing and low-rank branches need a linear or 1x1 layer")
        self.orig = orig
        self.kind = kind
        self.qweight = qweight                  # codes + scales: what save_quant_state writes
        self.act_spec = act_spec
        self.act_shift = float(act_shift)
        self.bos_fp = bos_fp
        self.quant_on = True
        w = orig.weight
        dtype, device = w.dtype, w.device
        w_fq = dequantize_weight(qweight, dtype) if qweight is not None else w.detach()
        # Contiguous copies: the same values in another memory layout can take another BLAS path
        # and round differently, and loaded states must reproduce quantized outputs bit for bit.
        self.register_buffer("w_fq", w_fq.to(device).contiguous(), persistent=False)
        self.register_buffer("smooth", None if smooth is None else smooth.to(device, dtype).contiguous(),
                             persistent=False)
        if lowrank is not None:
            self.register_buffer("lr_down", lowrank[0].to(device, dtype).contiguous(), persistent=False)
            self.register_buffer("lr_up", lowrank[1].to(device, dtype).contiguous(), persistent=False)
        else:
            self.lr_down = self.lr_up = None
        self.register_buffer("act_lo", None if act_range is None else act_range[0].to(device, torch.float32),
                             persistent=False)
        self.register_buffer("act_hi", None if act_range is None else act_range[1].to(device, torch.float32),
                             persistent=False)
        self.register_buffer("bias_q", self._bias_after_shift(), persistent=False)

    # Look like the wrapped layer to code that inspects it (dtype checks, in/out sizes).
    @property
    def weight(self) -> torch.Tensor:
        return self.orig.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.orig.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride",
                        "padding", "dilation", "groups"):
                return getattr(self.orig, name)
            raise

    def _bias_after_shift(self) -> torch.Tensor | None:
        """Linear/1x1 layers fold the activation shift into the bias: W (x + s) - W s = W x."""
        b = self.orig.bias
        if not self.act_shift or self.kind == "conv":
            return None if b is None else b.detach()
        w = self.orig.weight.detach().to(torch.float32)
        corr = self.act_shift * w.reshape(w.shape[0], -1).sum(1)
        base = torch.zeros_like(corr) if b is None else b.detach().to(torch.float32)
        return (base - corr).to(self.orig.weight.dtype)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quant_on:
            return self.orig(x)
        if self.kind == "conv":
            return self._conv(x)
        if self.kind == "pointwise":   # (B, C, H, W) -> channels last -> linear -> back
            return self._linear(x.movedim(1, -1), self.w_fq.flatten(1)).movedim(-1, 1)
        y = self._linear(x, self.w_fq)
        if self.bos_fp and x.dim() == 3:   # BOS-aware: the first text token's K/V exactly as the FP layer's
            y = torch.cat([self.orig(x)[:, :1], y[:, 1:]], dim=1)   # (on the whole sequence: same GEMM shape)
        return y

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.act_spec is None:
            xs = xq = x
        else:
            xs, xq = fake_quant_input(x, self.act_spec, self.act_shift, self.smooth, self.act_lo, self.act_hi,
                                      need_xs=self.lr_down is not None)
        if self.lr_down is None:
            return F.linear(xq, w, self.bias_q)
        lr = F.linear(F.linear(xs, self.lr_down), self.lr_up, self.bias_q)   # 16-bit branch on X'
        return torch.addmm(lr.flatten(0, -2), xq.flatten(0, -2), w.t()).view_as(lr)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_spec is not None:   # Q(X + shift) - shift: zero padding forbids folding the shift into the bias
            xc = x.movedim(1, -1)
            s = self.act_shift
            xq = fake_quant_act(xc + s, self.act_spec, True) - s if s else \
                fake_quant_act(xc, self.act_spec, False, self.act_lo, self.act_hi)
            x = xq.movedim(-1, 1)
        return self.orig._conv_forward(x, self.w_fq, self.bias_q)

    def extra_repr(self) -> str:
        w = "16" if self.qweight is None else f"{self.qweight.spec.fmt}{self.qweight.spec.bits}"
        a = "16" if self.act_spec is None else f"{self.act_spec.fmt}{self.act_spec.bits}"
        extra = "".join([", smooth" if self.smooth is not None else "",
                         f", rank={self.lr_down.shape[0]}" if self.lr_down is not None else "",
                         ", bos_fp" if self.bos_fp else ""])
        return f"{self.kind}, w={w}, a={a}{extra}"


def fake_quant_input(x: torch.Tensor, spec: QuantizerSpec, shift: float, smooth: torch.Tensor | None,
                     lo: torch.Tensor | None, hi: torch.Tensor | None, need_xs: bool = True
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """X' = (X + shift) * lambda^-1 and Q(X') (unsigned when shifted): fused Triton kernel on CUDA."""
    if x.is_cuda and _USE_TRITON:
        x = x.contiguous()
        if triton_kernels.supports(x, spec):
            if spec.granularity == "group":
                return triton_kernels.group_fake_quant(x, spec, shift, smooth, need_xs, hi)
            if not shift and smooth is None:
                return x, triton_kernels.tensor_fake_quant(x, spec, lo, hi)
    xs = x + shift if shift else x
    if smooth is not None:
        xs = xs * smooth
    return xs, fake_quant_act(xs, spec, shift > 0, lo, hi)


_USE_TRITON = os.environ.get("QDRIFT_NO_TRITON", "0") != "1"   # 1: reference path everywhere (debugging)


# ---------------------------------------------------------------------------- model-level passes
def fake_quant_layers(model: nn.Module) -> Iterator[tuple[str, FakeQuantLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLayer):
            yield name, m


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


@contextlib.contextmanager
def quant_enabled(model: nn.Module, enabled: bool = True):
    """Temporarily switch every fake-quant layer on or off (off = the original FP layers). Nests."""
    layers = [m for _, m in fake_quant_layers(model)]
    before = [m.quant_on for m in layers]
    for m in layers:
        m.quant_on = enabled
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.quant_on = b


def dequantize(model: nn.Module) -> nn.Module:
    """Undo `quantize`: put every original module back (outputs bit-identical to before)."""
    for name, m in list(fake_quant_layers(model)):
        replace_module(model, name, m.orig)
    if hasattr(model, "_qdrift_quant"):
        del model._qdrift_quant
    return model
