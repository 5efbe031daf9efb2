"""One call of the model's own diffusers pipeline for a batch of prompts and seeds."""
from __future__ import annotations

import torch

from qdrift.samplers import sampler_eta

FAMILIES_WITH_MAX_SEQ = ("pixart", "flux", "sana")


def call_pipeline(ctx, prompts: list[str], seeds: list[int], scheduler, output_type: str = "pt") -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (or latents) for `prompts`; sample b's noise comes from seed b alone.

    A CPU generator per sample makes every image independent of batch composition and device,
    and gives the FP, quantized and corrected variants the same initial (and ancestral) noise. DDIM
    with eta > 0 draws each step's noise from the same per-sample generators (diffusers' randn_tensor
    with a list of generators draws sample b from generator b).
    """
    cfg, family = ctx.cfg, ctx.family
    pipe = ctx.pipe
    pipe.scheduler = scheduler
    res = int(cfg.model.resolution)
    kwargs = dict(
        prompt=list(prompts),
        num_inference_steps=int(cfg.sampler.steps),
        height=res,
        width=res,
        generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        output_type=output_type,
        **family.call_kwargs,
    )
    eta = sampler_eta(cfg.sampler)
    if eta:   # DDIM's noise share: a step argument (config.py refuses it for pipelines without `eta`)
        kwargs["eta"] = eta
    guidance_arg = cfg.model.get("guidance_arg") or family.guidance_arg
    kwargs[guidance_arg] = float(cfg.sampler.guidance)
    if guidance_arg == "true_cfg_scale":  # FLUX-class true CFG needs an (empty) negative prompt
        kwargs["negative_prompt"] = [""] * len(prompts)
    if family.name in FAMILIES_WITH_MAX_SEQ and cfg.model.get("max_sequence_length"):
        kwargs["max_sequence_length"] = int(cfg.model.max_sequence_length)
    with torch.inference_mode():
        return pipe(**kwargs).images
