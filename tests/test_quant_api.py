"""The public API on tiny pipelines: quantize, FP mode, undo, save/load, determinism, errors."""
from __future__ import annotations

import pytest
import torch

from qdrift.models.families import denoiser_of
from qdrift.models.tiny import build_tiny
from qdrift.quant import (
    FakeQuantLayer, QuantSpec, algorithm_version, dequantize, fake_quant_layers, is_implemented, load_quant_state,
    quant_cache_key, quant_enabled, quantize, read_header, save_quant_state, select_layers,
)
from qdrift.quant import mixdq, rtn, svdquant
from qdrift.quant.calib import pipeline_calibrator, record_denoiser_calls, replay_calibrator

EXTRA = {
    "pixart": dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=16),
    "sd": {}, "sdxl": {}, "flux": dict(max_sequence_length=16),
    "sana": dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=16,
                 complex_human_instruction=None),
}
PROMPTS = ["a red circle above a blue square", "two green stars on a white background", "a black cat with a ring"]
SPECS = {
    "svdquant_w4a4": dict(method="svdquant", w_bits=4, a_bits=4, rank=4, alpha_grid=4, lowrank_iters=2,
                          calib_tokens=64),
    "svdquant_nvfp4": dict(method="svdquant", format="nvfp4", w_bits=4, a_bits=4, rank=4, alpha_grid=4,
                           lowrank_iters=1, calib_tokens=64),
    "mixdq_w4a8": dict(method="mixdq", w_bits=4, a_bits=8, sensitivity_prompts=1, keep_fp_acts=1),
    "rtn_w4a8": dict(method="rtn", w_bits=4, a_bits=8),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def spec(name: str, **kw) -> QuantSpec:
    return QuantSpec.from_config({"name": name, "calib_prompts": 1, **SPECS[name], **kw})


def tiny(family: str, seed: int = 0):
    """A tiny denoiser, a cheap replaying `calibrate` and one recorded call to compare outputs on."""
    pipe = build_tiny(family, seed)
    den = denoiser_of(pipe)
    calls = record_denoiser_calls(den, lambda: pipe(
        prompt=PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, height=32, width=32,
        generator=torch.Generator().manual_seed(0), output_type="pt", **EXTRA[family]))
    return den, replay_calibrator(den, calls)


def output(den, calibrate) -> torch.Tensor:
    args, kwargs = calibrate.calls[-1]
    with torch.no_grad():
        out = den(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out.sample).clone()


@pytest.mark.parametrize("family, method", [
    ("pixart", "svdquant_w4a4"), ("pixart", "mixdq_w4a8"), ("pixart", "rtn_w4a8"), ("sd", "svdquant_w4a4"),
    ("sdxl", "rtn_w4a8"), ("flux", "svdquant_nvfp4"), ("sana", "svdquant_w4a4"),
])
def test_quantize_fp_mode_and_undo_are_exact(family, method):
    den, calibrate = tiny(family)
    fp_out = output(den, calibrate)
    originals = {n: den.get_submodule(n) for n in (s.name for s in select_layers(den, family))}
    weights = {n: m.weight.detach().clone() for n, m in originals.items()}
    report = quantize(den, spec(method), family, calibrate, progress=False)

    q_out = output(den, calibrate)
    assert torch.isfinite(q_out).all() and not torch.equal(q_out, fp_out)
    with quant_enabled(den, False):
        assert torch.equal(output(den, calibrate), fp_out)           # FP mode: the original layers
        with quant_enabled(den, True):                                # nesting restores the outer state
            assert torch.equal(output(den, calibrate), q_out)
        assert torch.equal(output(den, calibrate), fp_out)
    assert torch.equal(output(den, calibrate), q_out)

    # skipped layers are untouched; quantized layers wrap the very same module objects
    for r in report.layers:
        m = den.get_submodule(r.name)
        if r.w_bits >= 16 and r.a_bits >= 16:
            assert m is originals[r.name]
        else:
            assert isinstance(m, FakeQuantLayer) and m.orig is originals[r.name]
    assert report.quantized and 0 < report.packed_mb  # (tiny layers: the rank-4 branch can outweigh the savings)
    assert "average bits" in report.summary()

    dequantize(den)
    assert not list(fake_quant_layers(den)) and not hasattr(den, "_qdrift_quant")
    assert all(den.get_submodule(n) is m and torch.equal(m.weight, weights[n]) for n, m in originals.items())
    assert torch.equal(output(den, calibrate), fp_out)


@pytest.mark.parametrize("method", ["svdquant_w4a4", "svdquant_nvfp4", "mixdq_w4a8"])
def test_save_load_is_bit_identical_and_quantizing_is_deterministic(tmp_path, method):
    den, calibrate = tiny("pixart")
    s = spec(method)
    quantize(den, s, "pixart", calibrate, progress=False)
    q_out = output(den, calibrate)
    path = save_quant_state(den, tmp_path / "q.safetensors")
    assert read_header(path)["family"] == "pixart" and path.stat().st_size > 0

    fresh, fresh_cal = tiny("pixart")
    report = load_quant_state(fresh, s, "pixart", path)
    assert torch.equal(output(fresh, fresh_cal), q_out)
    assert report.name == method and report.avg_w_bits <= 4

    again, again_cal = tiny("pixart")                                  # same inputs -> same quantized model
    quantize(again, s, "pixart", again_cal, progress=False)
    assert torch.equal(output(again, again_cal), q_out)


def test_load_rejects_mismatches(tmp_path):
    den, calibrate = tiny("pixart")
    s = spec("rtn_w4a8")
    quantize(den, s, "pixart", calibrate, progress=False)
    path = save_quant_state(den, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="was made with quant config"):
        load_quant_state(tiny("pixart")[0], spec("rtn_w4a8", w_bits=8), "pixart", path)
    with pytest.raises(ValueError, match="model family"):
        load_quant_state(tiny("pixart")[0], s, "sana", path)
    other = tiny("sd")[0]                                              # other layer names
    with pytest.raises(ValueError, match="not in this denoiser"):
        load_quant_state(other, s, "pixart", path)
    with pytest.raises(RuntimeError, match="already quantized"):
        load_quant_state(den, s, "pixart", path)
    with pytest.raises(RuntimeError, match="already quantized"):
        quantize(den, s, "pixart", calibrate, progress=False)


def test_load_rejects_other_shapes(tmp_path):
    den, calibrate = tiny("pixart")
    s = spec("rtn_w4a8")
    quantize(den, s, "pixart", calibrate, progress=False)
    path = save_quant_state(den, tmp_path / "q.safetensors")
    fresh = tiny("pixart")[0]
    fresh.transformer_blocks[0].attn1.to_q = torch.nn.Linear(16, 24)
    with pytest.raises(ValueError, match="weight shape"):
        load_quant_state(fresh, s, "pixart", path)


def test_method_none_and_cache_key():
    den, calibrate = tiny("pixart")
    none = QuantSpec.from_config({"name": "none", "method": "none"})
    assert is_implemented(none) and all(is_implemented(spec(m)) for m in SPECS)
    report = quantize(den, none, "pixart", calibrate, progress=False)
    assert not report.quantized and not list(fake_quant_layers(den))
    k1 = quant_cache_key(spec("rtn_w4a8"), "tiny_pixart", PROMPTS)
    assert k1 == quant_cache_key(spec("rtn_w4a8"), "tiny_pixart", PROMPTS)
    assert k1 != quant_cache_key(spec("rtn_w4a8"), "tiny_pixart", PROMPTS[::-1])
    assert k1 != quant_cache_key(spec("rtn_w4a8", w_bits=8), "tiny_pixart", PROMPTS)


def test_quantize_through_the_real_pipeline():
    """The runner's path: calibrate(n) runs the pipeline on its own trajectory and returns images."""
    pipe = build_tiny("pixart")
    calibrate = pipeline_calibrator(pipe, PROMPTS, steps=2, guidance=3.0, height=32, width=32, **EXTRA["pixart"])
    fp = calibrate(2)
    assert fp.shape == (2, 3, 32, 32) and 0 <= fp.min() and fp.max() <= 1
    den = denoiser_of(pipe)
    report = quantize(den, spec("svdquant_w4a4", calib_prompts=2), "pixart", calibrate, progress=False)
    assert all(r.alpha is not None for r in report.layers if r.role == "quant")
    q = calibrate(2)
    assert not torch.equal(q, fp)
    with quant_enabled(den, False):
        assert torch.equal(calibrate(2), fp)


def test_algorithm_version_names_the_method_and_its_code_version():
    assert algorithm_version(spec("svdquant_w4a4")) == f"svdquant/{svdquant.ALGORITHM_VERSION}"
    assert algorithm_version(spec("svdquant_nvfp4")) == algorithm_version(spec("svdquant_w4a4"))
    assert algorithm_version(spec("mixdq_w4a8")) == f"mixdq/{mixdq.ALGORITHM_VERSION}"
    assert algorithm_version(spec("rtn_w4a8")) == f"rtn/{rtn.ALGORITHM_VERSION}"
    assert algorithm_version(QuantSpec.from_config({"name": "none", "method": "none"})) == "none/1"
    assert all(isinstance(m.ALGORITHM_VERSION, int) for m in (mixdq, rtn, svdquant))
