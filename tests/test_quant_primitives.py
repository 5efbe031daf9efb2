"""Quantize-dequantize primitives: levels per group, half-step error bound, NVFP4 grids, packing."""
from __future__ import annotations

import pytest
import torch

from qdrift.quant.primitives import (
    E2M1_GRID, _grouped, dequantize_weight, fake_quant_act, fake_quant_rows, fake_quant_weight, int_range,
    quantize_weight,
)
from qdrift.quant.spec import QuantizerSpec
from qdrift.quant.state import pack_codes, unpack_codes


pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(out=48, inp=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    w[:, 3] *= 40          # an outlier input channel
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_group_has_at_most_2_pow_b_levels_and_half_step_error(bits):
    w = _weight()
    spec = QuantizerSpec(bits, "int", "group", 64)
    q = quantize_weight(w, spec)
    deq = dequantize_weight(q)
    # 200 input channels: groups of 64, 64, 64 and a zero-padded 8
    groups, _ = _grouped(deq, 64)
    for row in groups.reshape(-1, 64)[:60]:
        assert row.unique().numel() <= 2**bits
    qmin, qmax = int_range(bits, True)
    assert q.codes.min() >= qmin and q.codes.max() <= qmax
    scale = _grouped(torch.ones_like(w), 64)[0] * q.scale                         # each element's step
    err = (_grouped(w, 64)[0] - _grouped(deq, 64)[0]).abs()
    assert torch.all(err <= scale / 2 * (1 + 1e-6))
    # the 16-bit scales are exactly representable in float16
    assert torch.equal(q.scale, q.scale.half().float())


def test_per_channel_weights_and_conv_layout():
    w = torch.randn(8, 6, 3, 3)
    spec = QuantizerSpec(4, "int", "channel")
    deq = fake_quant_weight(w, spec)
    assert deq.shape == w.shape
    for o in range(8):
        assert deq[o].unique().numel() <= 16
        step = w[o].abs().max() / 7
        assert (deq[o] - w[o]).abs().max() <= step / 2 + 1e-6
    # group quantization of a conv runs along input channels for every kernel tap
    g = fake_quant_weight(w, QuantizerSpec(4, "int", "group", 64))
    assert g.shape == w.shape and torch.allclose(g, w, atol=w.abs().max() / 7)


@pytest.mark.parametrize("unsigned", [False, True])
def test_activation_groups_levels_and_bound(unsigned):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, 128, generator=g) * 3
    if unsigned:
        x = torch.nn.functional.gelu(x) + 0.171875      # post-GELU input, shifted to be >= 0
        assert x.min() >= 0
    spec = QuantizerSpec(4)
    q = fake_quant_act(x, spec, unsigned=unsigned)
    qmin, qmax = int_range(4, signed=not unsigned)
    xg, qg = x.reshape(-1, 64), q.reshape(-1, 64)
    amax = xg.abs().amax(1, keepdim=True)
    step = amax / qmax
    for row in qg:
        assert row.unique().numel() <= 16
    assert torch.all((xg - qg).abs() <= step / 2 * (1 + 1e-6))
    if unsigned:
        assert q.min() >= 0
        # unsigned uses all 16 levels on [0, amax]: half the step of signed 4-bit
        signed_err = (fake_quant_act(x, spec, unsigned=False) - x).pow(2).mean()
        assert (q - x).pow(2).mean() < 0.6 * signed_err


def test_static_per_tensor_asymmetric_range():
    x = torch.linspace(-1.0, 3.0, 1000)
    spec = QuantizerSpec(8, "int", "tensor", symmetric=False, dynamic=False)
    q = fake_quant_act(x, spec, lo=torch.tensor(-1.0), hi=torch.tensor(3.0))
    assert q.unique().numel() <= 256
    assert (q - x).abs().max() <= 4.0 / 255 / 2 + 1e-6
    assert fake_quant_act(torch.zeros(3), spec, lo=torch.tensor(-1.0), hi=torch.tensor(3.0)).eq(0).all()
    # out-of-range values clip to the calibrated range
    assert fake_quant_act(torch.tensor([10.0]), spec, lo=torch.tensor(-1.0), hi=torch.tensor(3.0)) <= 3.0 + 1e-6


def test_nvfp4_values_lie_on_the_e2m1_grid_with_e4m3_scales():
    w = _weight(32, 96)
    spec = QuantizerSpec(4, "nvfp4", "group", 16)
    q = quantize_weight(w, spec)
    grid = torch.tensor(E2M1_GRID)
    vals = (q.codes.float() / 2).abs()
    assert torch.isin(vals, grid).all()
    assert torch.equal(q.scale, q.scale.to(torch.float8_e4m3fn).float())         # FP8 E4M3 group scales
    assert q.scale.max() <= 448 and q.tensor_scale.numel() == 1
    deq = dequantize_weight(q)
    ratio = deq.reshape(32, 6, 16) / (q.scale * q.tensor_scale)
    assert torch.isin(ratio.abs().round(decimals=5), grid).all()
    assert (deq - w).pow(2).mean() < 0.02 * w.pow(2).mean()
    # activations: each group of 16 over its effective scale (E4M3 group scale x tensor scale) is on the grid
    x = torch.randn(4, 64) * 5
    qa = fake_quant_act(x, spec).reshape(-1, 16)
    ts = x.abs().max() / (6 * 448)
    eff = (x.reshape(-1, 16).abs().amax(1, keepdim=True) / 6 / ts).to(torch.float8_e4m3fn).float() * ts
    assert torch.isin((qa / eff).abs().round(decimals=4), grid).all()
    assert (qa - x.reshape(-1, 16)).abs().max() <= eff.max()          # at most one grid step (2) x scale / 2


def test_batched_rows_match_single_weight_quantization():
    w = torch.stack([_weight(16, 128, s) for s in range(3)])
    for spec in (QuantizerSpec(3), QuantizerSpec(4, "nvfp4", "group", 16), QuantizerSpec(8, "int", "channel")):
        batched = fake_quant_rows(w, spec)
        for i in range(3):
            assert torch.equal(batched[i], fake_quant_weight(w[i], spec))


@pytest.mark.parametrize("spec", [QuantizerSpec(4), QuantizerSpec(3), QuantizerSpec(2, "int", "channel"),
                                  QuantizerSpec(4, "nvfp4", "group", 16), QuantizerSpec(8, "int", "channel")])
def test_code_packing_roundtrip(spec):
    q = quantize_weight(_weight(16, 64), spec)
    packed = pack_codes(q.codes, spec)
    if spec.bits <= 4:
        assert packed.dtype == torch.uint8 and packed.numel() == q.codes.numel() // 2
    assert torch.equal(unpack_codes(packed, spec, q.codes.shape), q.codes)


def test_invalid_quantizer_specs_are_rejected():
    with pytest.raises(ValueError, match="not supported"):
        QuantizerSpec(1)
    with pytest.raises(ValueError, match="nvfp4"):
        QuantizerSpec(4, "nvfp4", "group", 64)
    with pytest.raises(ValueError, match="format"):
        QuantizerSpec(4, "mxfp4")


def test_constants_divide_as_float32_reciprocal_products():
    """PyTorch's CUDA kernels turn `t / 7` into t * float32(1/7); its CPU kernels divide. The quantizer always
    multiplies, so scales (and codes) do not depend on the device."""
    from qdrift.quant.primitives import div_const

    a = torch.arange(1, 4097, dtype=torch.float32) * 0.37
    assert torch.equal(div_const(a, 7), a * torch.tensor(1 / 7, dtype=torch.float32))
    assert not torch.equal(div_const(a, 7), a / 7)                    # the two roundings do differ at times
    x = torch.randn(8, 64) * 3
    s = x.abs().amax(-1, keepdim=True) * torch.tensor(1 / 7, dtype=torch.float32)
    assert torch.equal(fake_quant_act(x, QuantizerSpec(4)), torch.clamp(torch.round(x / s), -8, 7) * s)
