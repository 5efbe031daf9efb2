"""build: load the model's pipeline, record what weights it holds, and set up the sampler's scheduler."""
from __future__ import annotations

from qdrift.models.identity import weights_identity
from qdrift.models.loaders import load_pipeline
from qdrift.samplers import make_scheduler, sampler_options


def build(ctx) -> None:
    cfg = ctx.cfg
    ctx.pipe = load_pipeline(cfg.model, ctx.device)
    ctx.weights = weights_identity(cfg.model, ctx.pipe)   # joins every cache key below
    # sampler.options minus the step arguments (DDIM's eta), which the pipeline call passes (stages/sampling.py)
    ctx.base_scheduler = make_scheduler(cfg.sampler.name, ctx.pipe.scheduler, cfg.model.prediction,
                                        sampler_options(cfg.sampler)[0])
    ctx.pipe.scheduler = ctx.base_scheduler
