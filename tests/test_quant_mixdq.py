"""MixDQ: the integer program respects the bit budget; BOS-aware cross-attention K/V; sensitivity."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from qdrift.models.families import denoiser_of
from qdrift.models.tiny import build_tiny
from qdrift.quant import QuantSpec, dequantize, fake_quant_layers, quant_enabled, quantize
from qdrift.quant.bitalloc import allocate_bits
from qdrift.quant.calib import record_denoiser_calls, replay_calibrator
from qdrift.quant.mixdq import noise_to_signal, ssim
from qdrift.quant.observers import InputObserver

PIXART_CALL = dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", range(5))
def test_integer_program_respects_budget_and_is_optimal(seed):
    rng = np.random.default_rng(seed)
    options = (2, 4, 8)
    n = 6
    errors = np.sort(rng.random((n, 3)), axis=1)[:, ::-1] * rng.random((n, 1)) * 10   # fewer bits, more error
    sizes = rng.integers(1, 1000, n)
    bits = allocate_bits(errors, sizes, options, budget=4)
    assert (sizes * bits).sum() <= 4 * sizes.sum()
    # brute force over all 3^6 assignments: the program finds the best feasible one
    best = min((sum(errors[i, options.index(b)] for i, b in enumerate(combo)), combo)
               for combo in itertools.product(options, repeat=n) if (sizes * np.array(combo)).sum() <= 4 * sizes.sum())
    chosen = sum(errors[i, options.index(b)] for i, b in enumerate(bits))
    assert chosen == pytest.approx(best[0])


def test_integer_program_edge_cases():
    errors = np.array([[3.0, 2.0, 1.0]] * 4)
    assert allocate_bits(errors, np.ones(4), (2, 4, 8), budget=8).tolist() == [8, 8, 8, 8]
    assert allocate_bits(errors, np.ones(4), (2, 4, 8), budget=2).tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="below the smallest"):
        allocate_bits(errors, np.ones(4), (2, 4, 8), budget=1)


def test_bos_observer_skips_the_first_token():
    obs = InputObserver(skip_first_token=True)
    x = torch.zeros(2, 5, 3)
    x[:, 0] = 100.0
    x[:, 1:] = torch.linspace(-1, 1, 12).reshape(1, 4, 3)
    obs(torch.nn.Linear(3, 3), (x,))
    lo, hi = obs.range()
    assert hi.item() == pytest.approx(1.0) and lo.item() == pytest.approx(-1.0) and obs.tokens == 8


def test_image_metrics():
    a = torch.rand(2, 3, 16, 16)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, torch.rand(2, 3, 16, 16)) < 0.5
    assert noise_to_signal(a, a) == 0.0


@pytest.fixture(scope="module")
def tiny_pixart():
    pipe = build_tiny("pixart")
    den = denoiser_of(pipe)
    calls = record_denoiser_calls(den, lambda: pipe(
        prompt=["a red circle above a blue square", "two green stars"], num_inference_steps=2, guidance_scale=3.0,
        height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="pt", **PIXART_CALL))
    return den, replay_calibrator(den, calls)


def _mixdq(w_bits=4, **kw) -> QuantSpec:
    cfg = dict(name=f"mixdq_w{w_bits}a8", method="mixdq", w_bits=w_bits, a_bits=8, calib_prompts=2,
               sensitivity_prompts=1, keep_fp_acts=2)
    return QuantSpec.from_config({**cfg, **kw})


def test_mixdq_bos_kv_is_full_precision_and_budget_holds(tiny_pixart):
    den, calibrate = tiny_pixart
    report = quantize(den, _mixdq(), "pixart", calibrate, progress=False)
    try:
        layers = dict(fake_quant_layers(den))
        kv = [n for n in layers if ".attn2.to_k" in n or ".attn2.to_v" in n]
        assert kv and all(layers[n].bos_fp for n in kv)
        x = torch.randn(2, 7, 16) * 3
        for n in kv:
            y = layers[n](x)
            with torch.no_grad():
                y_fp = layers[n].orig(x)
            assert torch.equal(y[:, 0], y_fp[:, 0])                  # BOS token: FP K/V, bit for bit
            assert not torch.equal(y[:, 1:], y_fp[:, 1:])            # the rest quantized
        # inside the model too: the BOS key equals the FP model's, bit for bit
        keys = {}
        hook = layers[kv[0]].register_forward_hook(lambda m, i, o: keys.setdefault(m.quant_on, o))
        args, kwargs = calibrate.calls[0]
        den(*args, **kwargs)
        with quant_enabled(den, False):
            den(*args, **kwargs)
        hook.remove()
        assert torch.equal(keys[True][:, 0], keys[False][:, 0]) and not torch.equal(keys[True], keys[False])
        # budget: parameter-weighted average weight bits <= 4; exactly keep_fp_acts activations in 16 bit
        q = report.quantized
        assert sum(r.w_bits * r.params for r in q) <= 4 * sum(r.params for r in q)
        assert {r.w_bits for r in q} <= {2, 4, 8}
        assert report.num_fp16_acts == 2
        assert all(set(r.sensitivity) == {"w2", "w4", "w8", "a8"} for r in q)
        assert not any(n.startswith(("adaln_single", "caption_projection", "pos_embed", "proj_out")) for n in layers)
    finally:
        dequantize(den)


def test_mixdq_w8a8_is_uniform_8_bit_without_sensitivity_runs(tiny_pixart):
    den, calibrate = tiny_pixart
    calls = []
    report = quantize(den, _mixdq(8, keep_fp_acts=0), "pixart", lambda n: calls.append(n) or calibrate(n),
                      progress=False)
    dequantize(den)
    assert calls == [2]                                               # only the range-calibration run
    assert {(r.w_bits, r.a_bits) for r in report.quantized} == {(8, 8)}


def test_mixdq_sensitivity_search_resumes_after_a_kill(tiny_pixart, tmp_path, monkeypatch):
    """A search killed half way resumes from its journal: only the missing runs are made again, and the
    quantized model equals that of an uninterrupted search."""
    den, calibrate = tiny_pixart
    full_calls = []
    report = quantize(den, _mixdq(), "pixart", lambda n: full_calls.append(n) or calibrate(n), progress=False)
    expected = {r.name: (r.w_bits, r.a_bits, r.sensitivity) for r in report.quantized}
    dequantize(den)
    searches = len(full_calls) - 2                   # minus the range run and the FP reference run

    journal, calls = tmp_path / "sensitivity.json", []

    def dies_half_way(n):
        calls.append(n)
        if len(calls) == 2 + searches // 2:
            raise KeyboardInterrupt
        return calibrate(n)

    monkeypatch.setattr("qdrift.quant.mixdq.JOURNAL_EVERY_S", 0.0)     # journal after every run
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize(den, _mixdq(), "pixart", dies_half_way, progress=False, resume_file=journal)
        dequantize(den)
        kept = len(json.loads(journal.read_text())["sensitivity"])
        assert kept == searches // 2 - 1
        calls.clear()
        report = quantize(den, _mixdq(), "pixart", lambda n: calls.append(n) or calibrate(n), progress=False,
                          resume_file=journal)
    finally:
        dequantize(den)
    assert len(calls) == 2 + searches - kept
    assert {r.name: (r.w_bits, r.a_bits, r.sensitivity) for r in report.quantized} == expected
    for damaged in ("{not json",                                   # a damaged journal is ignored, not fatal
                    json.dumps({"sensitivity": {k: v for k, v in zip(  # non-numbers are measured again
                        [f"{name}/w2" for name in expected], [float("nan"), "0.1", True, float("inf")])}})):
        journal.write_text(damaged)
        calls.clear()
        report = quantize(den, _mixdq(), "pixart", lambda n: calls.append(n) or calibrate(n), progress=False,
                          resume_file=journal)
        dequantize(den)
        assert len(calls) == len(full_calls)
        assert {r.name: (r.w_bits, r.a_bits, r.sensitivity) for r in report.quantized} == expected
