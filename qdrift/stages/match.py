"""The matched drift's fit (drift/matched.py): R calibration runs in FP, then quantized and closed loop.

The FP pass records the latent variance after each step; the quantized pass, with the corrector in fit
mode, chooses each step's delta so that its latent variance follows. The R runs go through the pipeline
as one batch, because every step's delta depends on all of them: the fit is a function of R, the
calibration prompts and seeds, the model, sampler and quantized state, never of `batch_size` or of what
ran before. Cached as an artifact; a corrector variant's images key on it.
"""
from __future__ import annotations

import logging

from qdrift.cache import Artifact, atomic_write_bytes, read_safetensors, safetensors_bytes
from qdrift.drift import wrap_scheduler
from qdrift.drift.matched import FIT_POOLINGS, MatchedDrift, TargetRecorder
from qdrift.quant import quant_enabled

from .sampling import call_pipeline

log = logging.getLogger("qdrift")
FIT_FILE = "fit.safetensors"
FIT_FORMAT = "qdrift-matched-drift/1"
MATCH_VERSION = 1   # bump when a change alters what the fit computes


def match_artifact(ctx, spec: dict) -> Artifact:
    """The cached fit of a `kind: matched` corrector variant (computed or not)."""
    runs, c = int(spec.get("runs", 64)), ctx.cfg.calib
    return Artifact(ctx.cache_dir, "match", {
        **ctx.sampling_key(), "quant": ctx.quant_art.key if ctx.quant_art is not None else None,
        "prompts": ctx.prompt_set.calib_prompts(runs), "seeds": [int(c.seed) + i for i in range(runs)],
        "pooling": spec.get("pooling", "channel"), "layout": ctx.family.latent_layout, "algorithm": MATCH_VERSION,
    })


def fit_matched(ctx, spec: dict, hook: MatchedDrift) -> MatchedDrift:
    """`hook` with its fit, computed once per artifact and then read from the cache."""
    art = match_artifact(ctx, spec)
    pooling = art.inputs["pooling"]
    if pooling not in FIT_POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r} for the matched drift; choose one of {list(FIT_POOLINGS)}")
    art.ensure(lambda staging: _fit(ctx, art, hook, pooling, staging))
    tensors, _ = read_safetensors(art.file(FIT_FILE), FIT_FORMAT, {"delta"})
    return hook.use(tensors["delta"])


def _fit(ctx, art: Artifact, hook: MatchedDrift, pooling: str, staging) -> dict:
    prompts, seeds = art.inputs["prompts"], art.inputs["seeds"]
    steps = int(ctx.cfg.sampler.steps)
    log.info("matched drift: fitting on %d closed-loop calibration runs (one batch)", len(prompts))
    recorder = TargetRecorder(ctx.family.latent_layout)
    with quant_enabled(ctx.denoiser, False):
        call_pipeline(ctx, prompts, seeds, wrap_scheduler(ctx.base_scheduler, recorder), output_type="latent")
    hook.start_fit(recorder.table(steps), pooling)
    with quant_enabled(ctx.denoiser, ctx.quantized):
        call_pipeline(ctx, prompts, seeds, wrap_scheduler(ctx.base_scheduler, hook), output_type="latent")
    delta = hook.finish_fit()
    atomic_write_bytes(staging / FIT_FILE, safetensors_bytes({"delta": delta.contiguous()}, FIT_FORMAT,
                                                             {"runs": len(prompts), "pooling": pooling}))
    return {"runs": len(prompts), "delta_per_step": delta.mean(dim=1).tolist()}
