"""Scheduler wrappers: a diffusers scheduler whose `step` passes through a hook.

Every diffusers pipeline hands the final (guided) model output to `scheduler.step`, so this is
the one place where Q-Drift, the peer correctors and the calibration recorders plug in without
touching the pipelines. The wrapper is a dynamic subclass of the wrapped scheduler's class: it
keeps its config, `set_timesteps` signature, `isinstance` checks and `step` signature.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from diffusers import SchedulerMixin


class StepHook:
    """Override `prepare` (after set_timesteps) and/or `step`."""

    def prepare(self, scheduler) -> None:  # noqa: B027 - optional override
        """Called after every `set_timesteps`: recompute per-trajectory quantities here."""

    def step(self, scheduler, i: int, model_output: torch.Tensor, sample: torch.Tensor,
             parent: Callable[[torch.Tensor], object], step_kwargs: dict) -> torch.Tensor:
        """Return the next sample of step `i`; `parent(model_output)` runs the wrapped scheduler's step
        (`parent(model_output, eta=...)` with some of its keyword arguments replaced)."""
        return parent(model_output).prev_sample


class _Hooked:
    """Mixin placed in front of a diffusers scheduler class."""

    qdrift_hook: StepHook | None = None

    def set_timesteps(self, *args, **kwargs):
        out = super().set_timesteps(*args, **kwargs)
        if self.qdrift_hook is not None:
            self.qdrift_hook.prepare(self)
        return out

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        hook = self.qdrift_hook
        if hook is None:
            return super().step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
        if args:   # name positional extras (DDIM's eta, generator, ...): hooks read and override them by name
            names = list(inspect.signature(super().step).parameters)[3:]
            kwargs = {**dict(zip(names, args)), **kwargs}
            return_dict = kwargs.pop("return_dict", return_dict)
        i = step_index_of(self, timestep)
        result = {}

        def parent(output, **overrides):
            result["out"] = super(_Hooked, self).step(output, timestep, sample, return_dict=True,
                                                      **{**kwargs, **overrides})
            return result["out"]

        prev = hook.step(self, i, model_output, sample, parent, kwargs)
        if "out" not in result:
            raise RuntimeError(f"{type(hook).__name__}.step must call the wrapped scheduler's step once")
        out = result["out"]
        out.prev_sample = prev
        return out if return_dict else out.to_tuple()


def step_index_of(scheduler, timestep) -> int:
    """The index of the step about to run (DDIM keeps no step counter: look the timestep up)."""
    if hasattr(scheduler, "step_index"):
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        return scheduler.step_index
    matches = (scheduler.timesteps == torch.as_tensor(timestep).to(scheduler.timesteps.device)).nonzero()
    if len(matches) != 1:
        raise ValueError(f"timestep {timestep} is not exactly once in the scheduler's timesteps")
    return int(matches[0])


@functools.lru_cache(maxsize=None)
def _hooked_class(base: type) -> type:
    cls = type(base.__name__, (_Hooked, base), {"__module__": __name__, "__qualname__": base.__qualname__})
    # Pipelines inspect these signatures (custom sigmas, eta, generator): show the wrapped ones.
    for name in ("set_timesteps", "step"):
        method = getattr(_Hooked, name)

        def forward(self, *args, _method=method, **kwargs):
            return _method(self, *args, **kwargs)

        setattr(cls, name, functools.wraps(getattr(base, name))(forward))
    return cls


def base_class(scheduler) -> type:
    """The diffusers class under any qdrift wrapping."""
    cls = type(scheduler)
    return cls.__mro__[2] if issubclass(cls, _Hooked) else cls


def wrap_scheduler(scheduler: SchedulerMixin, hook: StepHook | None) -> SchedulerMixin:
    """A fresh scheduler of the same class and config whose steps pass through `hook`.

    `hook=None` gives the plain scheduler back (unwrapped), so callers can treat "no correction" uniformly.
    """
    base = base_class(scheduler)
    if hook is None:
        return base.from_config(scheduler.config)
    wrapped = _hooked_class(base).from_config(scheduler.config)
    wrapped.qdrift_hook = hook
    return wrapped
