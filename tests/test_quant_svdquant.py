"""SVDQuant on single layers: the low-rank branch, error vs plain RTN, W3 vs W4, smoothing search, rank check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qdrift.models.tiny import tiny_pixart
from qdrift.quant import QuantSpec
from qdrift.quant.api import quantize
from qdrift.quant.layers import FakeQuantLayer
from qdrift.quant.observers import InputObserver
from qdrift.quant.primitives import fake_quant_act, fake_quant_weight
from qdrift.quant.select import select_layers
from qdrift.quant.spec import QuantizerSpec
from qdrift.quant.svdquant import alpha_beta_grid, svdquant_linear


pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(**kw) -> QuantSpec:
    cfg = dict(name="t", method="svdquant", w_bits=4, a_bits=4, calib_prompts=1, alpha_grid=10, lowrank_iters=5)
    return QuantSpec.from_config({**cfg, **kw})


def _outlier_layer(inp=128, out=96, tokens=512, seed=0):
    """A linear layer whose inputs have a few huge channels (as in diffusion transformers)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g) / inp**0.5)
        lin.weight[:, :2] *= 6                                             # and a few large weight columns
    x = torch.randn(tokens, inp, generator=g)
    x[:, 5:9] *= 40
    return lin, x


def _quantize(lin, x, spec, shift=0.0):
    return svdquant_linear(lin, "linear", x, x.amin(0), x.amax(0), spec, shift, "layer")


def _rel_err(y, ref):
    return ((y - ref).pow(2).sum() / ref.pow(2).sum()).item()


def test_lowrank_branch_is_the_top32_svd_of_the_smoothed_weight_before_refinement():
    lin, x = _outlier_layer()
    layer, info = _quantize(lin, x, _spec(lowrank_iters=0))
    assert info["lowrank_iters"] == 0 and layer.lr_down.shape == (32, 128) and layer.lr_up.shape == (96, 32)
    w_smoothed = lin.weight.detach() / layer.smooth                 # W' = W diag(lambda)
    u, s, vh = torch.linalg.svd(w_smoothed)
    top32 = (u[:, :32] * s[:32]) @ vh[:32]
    assert torch.allclose(layer.lr_up @ layer.lr_down, top32, atol=1e-5 * s[0].item())
    # and the quantized residual is exactly W' minus that branch, quantized
    assert torch.equal(layer.w_fq, fake_quant_weight(w_smoothed - layer.lr_up @ layer.lr_down, QuantizerSpec(4)))


def test_w4a4_error_well_below_plain_rtn_on_outliers_and_w3_worse_than_w4():
    lin, x = _outlier_layer()
    ref = lin(x).detach()
    svd4, info4 = _quantize(lin, x, _spec())
    svd3, _ = _quantize(lin, x, _spec(w_bits=3))
    with torch.no_grad():
        e_svd4, e_svd3 = _rel_err(svd4(x), ref), _rel_err(svd3(x), ref)
        # plain RTN W4A4: same groups of 64, no smoothing, no branch
        plain = nn.functional.linear(fake_quant_act(x, QuantizerSpec(4)),
                                     fake_quant_weight(lin.weight, QuantizerSpec(4)), lin.bias)
        # RTN W4A4 as in the baseline method: per-channel weights, per-tensor activations
        per_ch = nn.functional.linear(
            fake_quant_act(x, QuantizerSpec(4, "int", "tensor", symmetric=False, dynamic=True)),
            fake_quant_weight(lin.weight, QuantizerSpec(4, "int", "channel")), lin.bias)
    e_plain, e_per_ch = _rel_err(plain, ref), _rel_err(per_ch, ref)
    assert e_svd4 < 0.05 * e_plain and e_svd4 < 0.05 * e_per_ch
    assert e_svd3 > e_svd4
    assert info4["alpha"] > 0                                        # outliers: smoothing is chosen
    assert info4["rel_error"] == pytest.approx(e_svd4, rel=0.05)     # the reported error is the real one


def test_nvfp4_layer_beats_plain_nvfp4():
    lin, x = _outlier_layer()
    ref = lin(x).detach()
    spec = _spec(format="nvfp4")
    layer, _ = _quantize(lin, x, spec)
    fp4 = QuantizerSpec(4, "nvfp4", "group", 16)
    with torch.no_grad():
        plain = nn.functional.linear(fake_quant_act(x, fp4), fake_quant_weight(lin.weight, fp4), lin.bias)
        assert _rel_err(layer(x), ref) < 0.5 * _rel_err(plain, ref)


def test_refinement_never_worse_and_runs_are_deterministic():
    lin, x = _outlier_layer(seed=1)
    _, no_refine = _quantize(lin, x, _spec(lowrank_iters=0))
    a, refined = _quantize(lin, x, _spec(lowrank_iters=8))
    b, again = _quantize(lin, x, _spec(lowrank_iters=8))
    assert refined["rel_error"] <= no_refine["rel_error"]
    assert refined == again
    for buf in ("w_fq", "smooth", "lr_down", "lr_up"):
        assert torch.equal(getattr(a, buf), getattr(b, buf))


def test_unsigned_shift_is_folded_into_the_bias():
    """Post-GELU inputs: (X + s) quantized unsigned; with 8-bit activations the output stays close to FP."""
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(64, 32)
    x = nn.functional.gelu(torch.randn(256, 64, generator=g) * 2)
    spec = QuantSpec.from_config(dict(name="t", method="svdquant", w_bits=8, a_bits=8, calib_prompts=1,
                                      alpha_grid=4, lowrank_iters=0, rank=8))
    layer, _ = _quantize(lin, x, spec, shift=0.171875)
    with torch.no_grad():
        assert _rel_err(layer(x), lin(x)) < 1e-3
    assert not torch.equal(layer.bias_q, lin.bias)


def test_grid_and_fp_mode():
    grid = alpha_beta_grid(20)
    assert len(grid) == 39 and grid[0] == (0.0, 0.0) and (0.5, 0.5) in grid and (0.25, 0.0) in grid
    lin, x = _outlier_layer()
    layer, _ = _quantize(lin, x, _spec())
    assert isinstance(layer, FakeQuantLayer) and layer.orig is lin
    layer.quant_on = False
    assert torch.equal(layer(x), lin(x))


def test_a_rank_as_wide_as_a_layer_is_refused_before_calibrating():
    """Rank >= min(in, out) keeps the whole weight in 16 bit: zero error, nothing quantized."""
    den = tiny_pixart().transformer
    narrowest = min(min(m.weight.shape[0], m.weight[0].numel())
                    for m in (den.get_submodule(s.name) for s in select_layers(den, "pixart") if s.role == "quant"))
    calls = []
    with pytest.raises(ValueError, match=rf"rank {narrowest} >= width {narrowest} of layer .*quant.rank=N"):
        quantize(den, _spec(rank=narrowest), "pixart", calls.append, progress=False)
    assert calls == []                                                   # refused before any calibration


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)"))])
def test_observer_reservoir_stays_on_device_and_is_uniform(device):
    """The token sample is a seeded, uniform subset of every row seen, kept on the input's device."""
    calls = [torch.arange(i * 300, (i + 1) * 300, dtype=torch.float32, device=device).repeat(4, 1).T
             for i in range(20)]                                 # 20 calls of 300 distinct tokens, 4 channels
    layer = torch.nn.Linear(4, 4)

    def observe(seed):
        obs = InputObserver(500, seed=seed, name="blocks.0.attn")
        for x in calls:
            obs(layer, (x,))
        return obs

    a, b, c = observe(0), observe(0), observe(1)
    assert a.sample.device.type == device and a.sample.shape == (500, 4)
    assert torch.equal(a.sample, b.sample) and not torch.equal(a.sample, c.sample)
    ids = a.sample[:, 0].long().cpu()
    assert ids.unique().numel() == 500 and int(ids.max()) < 6000   # distinct rows, each one seen
    # Uniform over calls: each third of the 6000 tokens holds about a third of the sample.
    thirds = torch.bincount(ids // 2000, minlength=3)
    assert int(thirds.min()) > 120, thirds
    assert float(a.ch_max[0]) == 5999 and a.tokens == 6000 and a.calls == 20
