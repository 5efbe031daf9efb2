"""Calibration: K paired FP / quantized runs -> per-run moment records (method.md section 3).

Both models are evaluated on the *same* latent x_i of the full-precision trajectory, after
classifier-free guidance is combined. Inside an unmodified diffusers pipeline this takes two
passes per batch: the FP pass records its trajectory (`TrajectoryRecorder`); the quantized pass
is teacher-forced onto it (`TeacherForcing`): at step i it sees the quantized guided output at
x_i, adds (u, e) to the moments, and returns the FP trajectory's x_{i+1} as its next sample.

Besides the moments, each run keeps a small fixed set of raw samples (samples.py) for the paper's
Fig. 4 and Fig. 5.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from . import moments
from .hooks import StepHook, wrap_scheduler
from .layout import by_channel, check_layout
from .samples import ErrorSamples, sample_coordinates, sample_steps
from .statistics import CalibrationPool

# Bump when a change alters what a calibration run records (2: raw error samples, ErrorSamples).
CALIBRATION_VERSION = 2

class PairedAccumulator:
    """Moment records of (u, e) for a batch of runs: scalar (B, S, 6) and per channel (B, S, C, 6)."""

    def __init__(self, num_steps: int, layout: str = "image", trim_std: float = 4.0):
        check_layout(layout)
        self.num_steps, self.layout, self.trim_std = num_steps, layout, trim_std
        self.scalar: torch.Tensor | None = None
        self.channel: torch.Tensor | None = None
        self.seen = torch.zeros(num_steps, dtype=torch.bool)
        self.sample_steps = sample_steps(num_steps)
        self.raw: dict = {}                       # ErrorSamples' coordinates and u, e, field at sample_steps
        self.sampler_call: dict | None = None     # the pipeline's set_timesteps call (calibrate_batch)

    def add(self, i: int, u_quant: torch.Tensor, u_fp: torch.Tensor) -> None:
        u = by_channel(u_quant.detach().double(), self.layout)
        e = u - by_channel(u_fp.detach().double(), self.layout)
        b, c, _ = u.shape
        if self.scalar is None:
            self.scalar = torch.zeros(b, self.num_steps, moments.FIELDS, dtype=torch.float64)
            self.channel = torch.zeros(b, self.num_steps, c, moments.FIELDS, dtype=torch.float64)
        self.channel[:, i] = moments.trimmed_moments(u, e, self.trim_std).cpu()
        self.scalar[:, i] = moments.trimmed_moments(u.reshape(b, -1), e.reshape(b, -1), self.trim_std).cpu()
        self.seen[i] = True
        if i in self.sample_steps:
            self._keep(self.sample_steps.index(i), u.reshape(b, -1), e.reshape(b, -1), c)

    def _keep(self, j: int, u: torch.Tensor, e: torch.Tensor, channels: int) -> None:
        """The raw samples of step sample_steps[j]: each run's own values at fixed coordinates."""
        if not self.raw:
            positions = u.shape[1] // channels
            points, field_points = sample_coordinates(channels, positions)
            s = len(self.sample_steps)
            self.raw = {"points": points, "field_points": field_points, "channels": channels, "positions": positions,
                        "u": torch.zeros(u.shape[0], s, len(points)), "e": torch.zeros(u.shape[0], s, len(points)),
                        "field": torch.zeros(u.shape[0], s, len(field_points))}
        points, field_points = self.raw["points"].to(u.device), self.raw["field_points"].to(u.device)
        self.raw["u"][:, j] = u[:, points].float().cpu()
        self.raw["e"][:, j] = e[:, points].float().cpu()
        self.raw["field"][:, j] = e[:, field_points].float().cpu()

    def samples(self, manifest: dict | None = None) -> ErrorSamples:
        """The raw samples of this batch of runs (after every step was seen)."""
        if not self.raw or not all(bool(self.seen[i]) for i in self.sample_steps):
            raise RuntimeError("calibration did not see the steps whose raw samples are kept")
        r = self.raw
        return ErrorSamples(list(self.sample_steps), r["channels"], r["positions"], r["points"], r["field_points"],
                            r["u"], r["e"], r["field"], dict(manifest or {}))

    def pool(self, manifest: dict | None = None) -> CalibrationPool:
        if self.scalar is None or not bool(self.seen.all()):
            missing = (~self.seen).nonzero().flatten().tolist()
            raise RuntimeError(f"calibration did not see steps {missing}")
        return CalibrationPool(self.scalar, self.channel, dict(manifest or {}))


class TrajectoryRecorder(StepHook):
    """Records the latents x_i a sampler visits and the guided outputs it consumes."""

    def prepare(self, scheduler):
        self.samples: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.final: torch.Tensor | None = None
        self.timesteps = scheduler.timesteps.detach().double().cpu()

    def step(self, scheduler, i, model_output, sample, parent, step_kwargs):
        prev = parent(model_output).prev_sample
        self.samples.append(sample.detach().clone())
        self.outputs.append(model_output.detach().clone())
        self.final = prev.detach().clone()
        return prev

    def next_sample(self, i: int) -> torch.Tensor:
        return self.samples[i + 1] if i + 1 < len(self.samples) else self.final


class TeacherForcing(StepHook):
    """Keeps a second (quantized) pass on the recorded FP trajectory and accumulates (u, e)."""

    def __init__(self, recorder: TrajectoryRecorder, accumulator: PairedAccumulator):
        self.recorder, self.accumulator = recorder, accumulator

    def step(self, scheduler, i, model_output, sample, parent, step_kwargs):
        if not torch.equal(sample, self.recorder.samples[i]):
            raise RuntimeError(f"teacher forcing lost the FP trajectory at step {i}: the pipeline changed the latents")
        self.accumulator.add(i, model_output, self.recorder.outputs[i])
        parent(model_output)  # keep the wrapped scheduler's own state consistent
        return self.recorder.next_sample(i)


def calibrate_batch(run: Callable[[object, bool], None], scheduler, num_steps: int,
                    layout: str = "image", trim_std: float = 4.0, accumulator=None) -> tuple[PairedAccumulator, torch.Tensor]:
    """Paired moments of one batch of runs through an unmodified pipeline.

    `run(scheduler, quantized)` must run the pipeline on the batch (same prompts, same seeds both
    times) with the given scheduler and the denoiser in FP (`quantized=False`) or quantized mode.
    Returns the accumulator and the timesteps the sampler used. `accumulator`: anything with
    `add(i, u_quant, u_fp)` (default: a PairedAccumulator; error_map.py's keeps per-position sums); the
    pipeline's set_timesteps call is recorded on it as `sampler_call`.
    """
    recorder = TrajectoryRecorder()
    fp_scheduler = wrap_scheduler(scheduler, recorder)
    calls = _record_set_timesteps(fp_scheduler)
    run(fp_scheduler, False)
    if accumulator is None:
        accumulator = PairedAccumulator(num_steps, layout, trim_std)
    run(wrap_scheduler(scheduler, TeacherForcing(recorder, accumulator)), True)
    accumulator.sampler_call = calls[-1] if calls else None
    return accumulator, recorder.timesteps


def _record_set_timesteps(scheduler) -> list[dict]:
    """Record (as JSON) every set_timesteps call the pipeline makes on `scheduler`: its arguments
    set up the sampler (FLUX: shifted sigmas and mu), and `replay_set_timesteps` repeats them later."""
    calls: list[dict] = []
    real = scheduler.set_timesteps

    @functools.wraps(real)   # pipelines inspect its signature (sigmas=, timesteps=, mu=)
    def recording(*args, **kwargs):
        kept = {k: _to_json(v) for k, v in kwargs.items() if k != "device"}   # replayed on the CPU
        calls.append({"args": [_to_json(a) for a in args[:1]], "kwargs": kept})   # args[1]: the device
        return real(*args, **kwargs)

    scheduler.set_timesteps = recording
    return calls


def _to_json(v):
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return {"array": v.tolist(), "dtype": str(v.dtype).replace("torch.", ""), "tensor": isinstance(v, torch.Tensor)}
    return v.item() if isinstance(v, np.generic) else v


def _from_json(v):
    if isinstance(v, dict) and "array" in v:
        a = np.asarray(v["array"], dtype=v["dtype"])
        return torch.from_numpy(a) if v["tensor"] else a
    return v


def replay_set_timesteps(scheduler, call: dict):
    """Set `scheduler`'s timesteps as a recorded pipeline call did (on the CPU); a wrapped scheduler's
    hook is prepared by it."""
    scheduler.set_timesteps(*[_from_json(a) for a in call["args"]],
                            **{k: _from_json(v) for k, v in call["kwargs"].items()})
    return scheduler


@torch.no_grad()
def calibrate_denoisers(
    fp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    quantized: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    num_steps: int,
    *,
    layout: str = "image",
    trim_std: float = 4.0,
    manifest: dict | None = None,
) -> CalibrationPool:
    """Calibrate from two denoiser callables without a pipeline (k-diffusion style).

    `fp(x, t)` and `quantized(x, t)` return the guided raw output (epsilon, v or velocity) for the
    scaled input x at timestep t. `latents` is the initial noise of the K runs (one per row).
    """
    acc = PairedAccumulator(num_steps, layout, trim_std)
    timesteps = teacher_force(fp, quantized, scheduler, latents, num_steps, acc)
    info = {"steps": len(timesteps), "timesteps": timesteps.double().cpu().tolist(),
            "layout": layout, "channels": acc.channel.shape[2], "trim_std": trim_std}
    return acc.pool({**info, **(manifest or {})})


@torch.no_grad()
def teacher_force(fp, quantized, scheduler, latents: torch.Tensor, num_steps: int, accumulator) -> torch.Tensor:
    """Sample the FP trajectory from `latents` with two denoiser callables (`calibrate_denoisers`), handing
    both outputs at every FP state to `accumulator.add(i, u_quant, u_fp)`; returns the timesteps."""
    scheduler = wrap_scheduler(scheduler, None)  # a fresh, unwrapped copy: do not disturb the caller's
    scheduler.set_timesteps(num_steps)
    x = latents * float(getattr(scheduler, "init_noise_sigma", 1.0))
    for i, t in enumerate(scheduler.timesteps):
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        u_fp = fp(x_in, t)
        accumulator.add(i, quantized(x_in, t), u_fp)
        x = scheduler.step(u_fp, t, x).prev_sample
    return scheduler.timesteps
