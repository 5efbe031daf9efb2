"""On a GPU: the whole runner for every quant option on the tiny PixArt model, and how close the images of
one quantized state are on the CPU and on the GPU. Skipped without CUDA (run them on the device machine)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qdrift.eval.paired import psnr
from qdrift.models.families import denoiser_of
from qdrift.models.tiny import build_tiny
from qdrift.quant import QuantSpec, load_quant_state, quant_enabled, quantize, save_quant_state
from qdrift.quant.calib import pipeline_calibrator

from .conftest import CONF, compose_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")

QUANTS = sorted(p.stem for p in Path(CONF, "quant").glob("*.yaml") if p.stem != "none")
PROMPTS = ["a red circle above a blue square", "two green stars on a white background", "a black cat with a ring",
           "a yellow triangle", "three blue dots in a row", "an orange square on grey", "a green ring", "a red cross"]
PIXART = dict(use_resolution_binning=False, clean_caption=False, max_sequence_length=16)


@pytest.mark.parametrize("quant", QUANTS)
def test_every_quant_option_runs_on_cuda(run_tiny, quant):
    metrics, run_dir = run_tiny(["device=cuda", f"quant={quant}", "corrector=qdrift", "++quant.calib_prompts=4"])
    check_run(metrics, run_dir, "cuda")


def check_run(metrics: dict, run_dir: Path, device: str) -> None:
    assert metrics["device"].startswith(device)
    assert set(metrics["variants"]) == {"fp", "quant", "qdrift"}
    for variant, values in metrics["variants"].items():
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert all(math.isfinite(v) for v in numbers.values()), (variant, values)
        assert len(list((run_dir / "images" / variant).glob("*.png"))) == 4
    for variant in ("quant", "qdrift"):      # really quantized: not the FP images
        assert metrics["variants"][variant]["psnr_vs_fp"] < 100


@pytest.mark.parametrize("extra", [
    ["corrector=all"],
    ["sampler=ddim", "+sampler.options.eta=1.0", "corrector=[ptqd,d2dpm,d2dpm_stochastic,cumcomp]"],
])
def test_every_corrector_runs_on_cuda(run_tiny, extra):
    """Every corrector, and the peers on DDIM with its own noise (eta = 1), through the runner on the GPU."""
    metrics, run_dir = run_tiny(["device=cuda", "quant=rtn_w4a8", "++quant.calib_prompts=4", *extra])
    corrected = set(metrics["variants"]) - {"fp", "quant"}
    assert corrected >= {"ptqd", "d2dpm", "d2dpm_stochastic", "cumcomp"}
    for variant, values in metrics["variants"].items():
        assert all(math.isfinite(v) for v in values.values() if isinstance(v, float)), (variant, values)
        assert len(list((run_dir / "images" / variant).glob("*.png"))) == 4
    assert any(metrics["variants"][v]["psnr_vs_fp"] != metrics["variants"]["quant"]["psnr_vs_fp"] for v in corrected)


def _images(pipe, n: int) -> torch.Tensor:
    """What a run writes: n images from the first n prompts, noise seeds 0..n-1 drawn on the host, 8-bit."""
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    out = pipe(prompt=PROMPTS[:n], num_inference_steps=8, guidance_scale=4.5, height=32, width=32, generator=gens,
               output_type="pt", **PIXART).images
    return (out.float().cpu() * 255).round() / 255


def cross_device_psnr(tmp_path: Path, quant: str = "svdquant_w4a4", n: int = 8,
                      devices: tuple[str, str] = ("cpu", "cuda")) -> dict[str, float]:
    """Quantize once on the CPU, save; load that state on the CPU and on the GPU; mean PSNR of each image pair,
    for the quantized model and (as the yardstick) the FP model."""
    spec = QuantSpec.from_config(compose_cfg(["model=tiny_pixart", f"quant={quant}", "++quant.calib_prompts=2"]).quant)
    pipe = build_tiny("pixart")
    quantize(denoiser_of(pipe), spec, "pixart",
             pipeline_calibrator(pipe, PROMPTS, steps=4, guidance=4.5, height=32, width=32, **PIXART), progress=False)
    path = save_quant_state(denoiser_of(pipe), tmp_path / "state.safetensors")
    images = {}
    for i, device in enumerate(devices):
        pipe = build_tiny("pixart").to(device)
        pipe.set_progress_bar_config(disable=True)
        load_quant_state(denoiser_of(pipe), spec, "pixart", path)
        images[i, "quant"] = _images(pipe, n)
        with quant_enabled(denoiser_of(pipe), False):
            images[i, "fp"] = _images(pipe, n)
    out = {}
    for variant in ("quant", "fp"):
        a, b = images[0, variant], images[1, variant]
        out[variant] = psnr(b, a).mean().item()
        out[f"{variant}_min"] = psnr(b, a).min().item()
        out[f"{variant}_equal_pixels"] = (a == b).double().mean().item()
    out["quant_vs_fp"] = psnr(images[0, "quant"], images[0, "fp"]).mean().item()
    return out


def test_cpu_and_gpu_images_of_one_quantized_state(tmp_path):
    """One SVDQuant W4A4 state, loaded on the CPU and on the GPU, gives close images but NOT the same ones.

    The fake-quant is the same function on both (the Triton kernel equals the reference bit for bit),
    but the GEMMs, convolutions and attention of CPU and GPU round differently, and a 4-bit code that
    flips on the way moves the next layers. Measured on an H200 (tiny PixArt, 8 steps, 8 images, 8-bit
    PNG values): CPU vs GPU PSNR 66.0 dB (lowest image 65.1), 98.4 % of pixel values equal; the FP
    model's own CPU vs GPU gap is the same (65.9 dB, 98.3 %), and quantization moves images far more
    (49.1 dB vs FP). Asserted with margins: not identical, >= 60 dB for every image, within 3 dB of the
    FP model's gap, and 10 dB above the quantization error."""
    r = cross_device_psnr(tmp_path)
    print("cross-device:", r)
    assert r["quant_equal_pixels"] < 1.0
    assert r["quant_min"] > 60
    assert r["quant"] > r["fp"] - 3
    assert r["quant"] > r["quant_vs_fp"] + 10
