"""The fused CUDA kernels compute the reference quantizer bit for bit: in Triton's CPU interpreter, and
on a GPU (compiled, float16 and bfloat16, realistic shapes)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from qdrift.quant import triton_kernels as tk
    from qdrift.quant.primitives import fake_quant_act
    from qdrift.quant.spec import QuantizerSpec
    torch.manual_seed(0)
    x = torch.randn(40, 128) * torch.rand(128) * 5
    smooth = torch.rand(128) + 0.5
    narrow = torch.randn(40, 48) * 3   # 48 columns, not a multiple of 128: one group per program
    nvfp4 = QuantizerSpec(4, "nvfp4", "group", 16)
    cases = [(QuantizerSpec(4), 0.0, None, x), (QuantizerSpec(3), 0.0, None, x), (QuantizerSpec(4), 0.171875, None, x),
             (nvfp4, 0.0, None, x), (nvfp4, 0.0, torch.tensor(40.0), x),
             (nvfp4, 0.0, None, narrow), (QuantizerSpec(4, group_size=16), 0.0, None, narrow)]
    # float16: X' = (X + shift) * smooth is rounded to float16 twice, as the reference's tensors are
    # (bfloat16 only on a GPU: the interpreter truncates float32 -> bfloat16 instead of rounding)
    half = [(QuantizerSpec(8), 0.28125, None, x.half()), (QuantizerSpec(4), 0.171875, None, x.half()),
            (QuantizerSpec(3), 0.0, None, x.half()), (nvfp4, 0.0, None, x.half())]
    for spec, shift, hi, xin in cases + half:
        sm = smooth[: xin.shape[1]].to(xin.dtype)
        xs, xq = tk.group_fake_quant(xin, spec, shift, sm, True, hi)
        ref_xs = (xin + shift if shift else xin) * sm
        assert torch.equal(xs, ref_xs), (spec, xin.dtype)
        assert torch.equal(xq, fake_quant_act(ref_xs, spec, shift > 0, hi=hi)), (spec, shift, xin.dtype)
    spec = QuantizerSpec(8, "int", "tensor", symmetric=False, dynamic=False)
    lo, hi = torch.tensor(-3.0), torch.tensor(5.0)
    assert torch.equal(tk.tensor_fake_quant(x, spec, lo, hi), fake_quant_act(x, spec, False, lo, hi))
    print("ok")
""")


def test_triton_kernels_match_the_reference_quantizer():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- on a GPU
def _mismatch(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{(a != b).float().mean().item():.4%} of {a.numel()} values differ"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a GPU (run on the device machine)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("width", [1152, 4608])
def test_cuda_kernels_give_the_references_numbers_exactly(dtype, width, monkeypatch):
    """What a layer computes on 4096 tokens (PixArt's widths), the fused kernels vs the torch reference
    (`QDRIFT_NO_TRITON` path of `fake_quant_input`): X' and Q(X') equal element for element."""
    from qdrift.quant import layers, triton_kernels
    from qdrift.quant.spec import QuantizerSpec

    g = torch.Generator(device="cuda").manual_seed(width)
    dev = "cuda"
    chan = torch.exp(torch.randn(width, generator=g, device=dev))             # per-channel spread
    chan[:: width // 8] *= 30                                                # outlier channels
    x = (torch.randn(4096, width, generator=g, device=dev) * chan).to(dtype)
    gelu = torch.nn.functional.gelu(torch.randn(4096, width, generator=g, device=dev) * 2).to(dtype)
    silu = torch.nn.functional.silu(torch.randn(4096, width, generator=g, device=dev) * 2).to(dtype)
    smooth = torch.exp(0.5 * torch.randn(width, generator=g, device=dev)).to(dtype)
    nvfp4 = QuantizerSpec(4, "nvfp4", "group", 16)
    x_max = (x * smooth).abs().amax().float()
    cases = [(QuantizerSpec(b), 0.0, x, None) for b in (3, 4, 8)]                       # signed, smoothed
    cases += [(QuantizerSpec(b), 0.171875, gelu, None) for b in (3, 4, 8)]             # unsigned after GELU
    cases += [(QuantizerSpec(4), 0.28125, silu, None)]                                  # unsigned after SiLU
    cases += [(nvfp4, 0.0, x, None), (nvfp4, 0.0, x, x_max), (nvfp4, 0.0, x, 0.5 * x_max)]  # dynamic, static

    def both(*args):
        out = {}
        for use in (True, False):
            monkeypatch.setattr(layers, "_USE_TRITON", use)
            out[use] = layers.fake_quant_input(*args)
        return out[True], out[False]

    for spec, shift, inp, hi in cases:
        assert triton_kernels.supports(inp, spec)
        for sm in (smooth, None):
            (xs, xq), (ref_xs, ref_xq) = both(inp, spec, shift, sm, None, hi)
            what = f"{spec.fmt}{spec.bits} shift={shift} smooth={sm is not None} hi={hi is not None}"
            assert torch.equal(xs, ref_xs), f"X' {what}: {_mismatch(xs, ref_xs)}"
            assert torch.equal(xq, ref_xq), f"Q(X') {what}: {_mismatch(xq, ref_xq)}"
    for bits in (4, 8):                                            # static per-tensor (MixDQ / RTN)
        spec = QuantizerSpec(bits, "int", "tensor", symmetric=False, dynamic=False)
        lo, hi = x.float().amin() * 0.9, x.float().amax() * 0.9                 # some values clip
        (_, xq), (_, ref_xq) = both(x, spec, 0.0, None, lo, hi)
        assert torch.equal(xq, ref_xq), f"per-tensor int{bits}: {_mismatch(xq, ref_xq)}"
