"""Sampler names -> diffusers schedulers configured for a model's prediction type.

The new scheduler inherits the model's noise schedule (betas, timestep spacing, flow shift) from
the pipeline's own scheduler config, so switching sampler keeps the model's training schedule.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)


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
    cls = SAMPLERS[name].cls
    if prediction == "flow":
        if name == "flow_euler":
            over = {"shift": _flow_shift(cfg)}
            if cls is type(base):
                over = {}
            return cls.from_config(cfg, **over, **options)
        # DPM-Solver++ on flow sigmas (SANA's sampler; also runs FLUX-class models).
        over = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=_flow_shift(cfg),
                    algorithm_type="dpmsolver++", solver_order=2)
        if cls is type(base):
            over = dict(algorithm_type="dpmsolver++", solver_order=2)
        return cls.from_config(cfg, **{**over, **options})
    over = {"prediction_type": prediction}
    if name == "dpmpp":
        over.update(algorithm_type="dpmsolver++", solver_order=2)
    if name == "ddim":
        over.update(clip_sample=False)
    return cls.from_config(cfg, **{**over, **options})
