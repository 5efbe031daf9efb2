"""quantize: turn the denoiser into its fake-quantized twin, or load the cached twin."""
from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from qdrift.cache import Artifact, text_hash
from qdrift.quant import QuantSpec, load_quant_state, quantize, save_quant_state

from .context import QUANT_SEED_OFFSET
from .sampling import call_pipeline

log = logging.getLogger("qdrift")


def quantize_stage(ctx) -> dict | None:
    """Quantize in place; returns the quantizer's summary (None when quant=none)."""
    cfg = ctx.cfg
    if not ctx.quantized:
        return None
    spec = QuantSpec.from_config(cfg.quant)
    prompts = ctx.prompt_set.calib_prompts(spec.calib_prompts)
    seed0 = int(cfg.calib.seed) + QUANT_SEED_OFFSET
    art = Artifact(ctx.cache_dir, "quant", {**ctx.sampling_key(), "quant": ctx.quant_key(),
                                           "prompts": text_hash(prompts), "seed": seed0})
    state = art.path / "state.safetensors"
    if art.done():
        load_quant_state(ctx.denoiser, spec, ctx.family.name, state)
        log.info("quantized model loaded from cache %s", art.path)
        return art.manifest().get("report")

    def calibrate(num_prompts: int) -> torch.Tensor:
        """Run the FP pipeline (its own trajectory) on the first `num_prompts` calibration prompts."""
        images = []
        bs = int(cfg.batch_size)
        # One bar for multi-batch calls; MixDQ's hundreds of one-batch sensitivity runs have their own.
        for start in tqdm(range(0, num_prompts, bs), desc="PTQ calibration", leave=False, disable=num_prompts <= bs):
            idx = range(start, min(start + bs, num_prompts))
            images.append(call_pipeline(ctx, [prompts[i] for i in idx], [seed0 + i for i in idx], ctx.base_scheduler))
        return torch.cat(images)

    report = quantize(ctx.denoiser, spec, ctx.family.name, calibrate, progress=True)  # logs its summary
    save_quant_state(ctx.denoiser, art.file("state.safetensors"))
    summary = report.to_dict() if hasattr(report, "to_dict") else {"summary": report.summary()}
    art.finish(report=summary)
    return summary
