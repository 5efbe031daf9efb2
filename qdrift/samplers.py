"""Sampler names -> diffusers schedulers configured for a model's prediction type.

The new scheduler inherits the model's noise schedule (betas, timestep spacing, flow shift) from
the pipeline's own scheduler config, so switching sampler keeps the model's training schedule.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from omegaconf import OmegaConf


@dataclass(frozen=True)
class SamplerDef:
    cls: type
    predictions: tuple[str, ...]   # model prediction types the sampler can run
    description: str


SAMPLERS = {
    "euler": SamplerDef(EulerDiscreteScheduler, ("epsilon", "v_prediction"), "Euler"),
    "euler_a": SamplerDef(EulerAncestralDiscreteScheduler, ("epsilon", "v_prediction"), "Euler ancestral"),
    "flow_euler": SamplerDef(FlowMatchEulerDiscreteScheduler, ("flow",), "flow-matching Euler"),
    "dpmpp": SamplerDef(DPMSolverMultistepScheduler, ("epsilon", "v_prediction", "flow"), "DPM-Solver++ 2M"),
    "ddim": SamplerDef(DDIMScheduler, ("epsilon", "v_prediction"), "DDIM"),
}


# Sampler options that are arguments of each scheduler step, not scheduler config: the pipeline call passes
# them (`scheduler.from_config` would drop them silently). DDIM's eta: the share of its own noise, in [0, 1].
STEP_OPTIONS = {"ddim": ("eta",)}


def split_options(name: str, options: Mapping | None) -> tuple[dict, dict]:
    """`sampler.options` -> (scheduler config options, step arguments for the pipeline call)."""
    options = dict(options or {})
    step = {k: options.pop(k) for k in STEP_OPTIONS.get(name, ()) if k in options}
    return options, step


def sampler_options(sampler_cfg) -> tuple[dict, dict]:
    """(scheduler config options, step arguments) of a config's `sampler` node."""
    options = sampler_cfg.get("options") or {}
    if OmegaConf.is_config(options):
        options = OmegaConf.to_container(options, resolve=True)
    return split_options(sampler_cfg.name, options)


def sampler_eta(sampler_cfg) -> float:
    """DDIM's eta of a config's `sampler` node (0: deterministic; other samplers have none)."""
    return float(sampler_options(sampler_cfg)[1].get("eta") or 0.0)


def check_sampler(name: str, prediction: str) -> None:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    allowed = SAMPLERS[name].predictions
    if prediction not in allowed:
        raise ValueError(f"sampler {name!r} cannot run a {prediction}-prediction model "
                         f"(it runs {', '.join(allowed)} models)")


def _flow_shift(config) -> float:
    for key in ("shift", "flow_shift"):
        if config.get(key) is not None:
            return float(config[key])
    return 1.0


def make_scheduler(name: str, base, prediction: str, options: dict | None = None):
    """A scheduler for sampler `name`, derived from the pipeline's scheduler `base`."""
    check_sampler(name, prediction)
    cfg = dict(base.config)
    options = dict(options or {})
    step = sorted(set(options) & set(STEP_OPTIONS.get(name, ())))
    if step:
        raise ValueError(f"{step} are arguments of {name}'s steps, not scheduler config (from_config would drop "
                         "them): pass them to the pipeline call (split_options)")
    cls = SAMPLERS[name].cls
    if prediction == "flow":
        if name == "flow_euler":
            return cls.from_config(cfg, **options) if cls is type(base) else \
                cls.from_config(cfg, shift=_flow_shift(cfg), **options)
        return _flow_dpmpp(cls, cfg, options)
    over = {"prediction_type": prediction}
    if name == "dpmpp":
        over.update(algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        over.update(clip_sample=False)
    return cls.from_config(cfg, **{**over, **options})


def _flow_dpmpp(cls, cfg: dict, options: dict):
    """DPM-Solver++ on flow sigmas with the base scheduler's time shift.

    FluxPipeline always passes a resolution shift `mu`, which DPM-Solver accepts only with dynamic
    exponential shifting; a static shift s is the special case base_shift = max_shift = log(s), so
    both pipelines that pass `mu` and those that don't (SANA) see the same schedule.
    """
    dynamic = bool(cfg.get("use_dynamic_shifting"))
    shift = _flow_shift(cfg)
    sch = cls.from_config(cfg, **{
        "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": shift,
        "algorithm_type": "dpmsolver++", "solver_order": 2, "use_dynamic_shifting": True,
        "time_shift_type": "exponential", **options})
    mu_range = {k: cfg[k] for k in ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
                if k in cfg} if dynamic else {"base_shift": math.log(shift), "max_shift": math.log(shift)}
    sch.register_to_config(**mu_range)  # FluxPipeline reads these from scheduler.config to compute mu
    return sch
