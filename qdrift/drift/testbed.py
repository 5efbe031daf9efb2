"""Analytic testbed (method.md section 8): exact denoisers on Gaussian-mixture data.

Every coordinate of x0 is drawn from a 1-D Gaussian mixture, so E[x0 | x_t] is known in closed
form and the "FP model" is exact. The "quantized model" adds a correlated part, a bias and fresh
Gaussian noise of a known, late-growing variance at every call (SETTINGS: noise only, or all three).
Correctors are calibrated with the real calibration code and run through the real scheduler wrappers;
the final samples are compared with the FP sampler's (which, with few steps, is itself off the data)
and with the true data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from .calibration import calibrate_denoisers, teacher_force
from .correctors import make_corrector
from .error_map import ErrorMapAccumulator
from .hooks import wrap_scheduler
from .rules import schedule_of

_SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
SAMPLERS = {
    "euler": lambda: EulerDiscreteScheduler(**_SD_BETAS),
    "euler_a": lambda: EulerAncestralDiscreteScheduler(**_SD_BETAS),
    "flow_euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "dpmpp": lambda: DPMSolverMultistepScheduler(**_SD_BETAS, algorithm_type="dpmsolver++", solver_order=2),
    "dpmpp_flow": lambda: DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0, algorithm_type="dpmsolver++", solver_order=2),
    "ddim": lambda: DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
}
# Testbed samplers: the schedulers above, and DDIM with eta = 1 (its own noise each step, PTQD's setting).
KINDS = (*SAMPLERS, "ddim_eta")
STEP_ARGS = {"ddim_eta": {"eta": 1.0}}
NOISY = ("euler_a", "ddim_eta")   # samplers that draw noise (from a seeded generator)


def scheduler_for(kind: str):
    return SAMPLERS["ddim" if kind == "ddim_eta" else kind]()


@dataclass(frozen=True)
class Mixture:
    """x0 per coordinate ~ sum_k w_k N(m_k, s^2)."""

    means: tuple[float, ...] = (-1.0, 1.0)
    weights: tuple[float, ...] = (0.5, 0.5)
    std: float = 0.15

    def sample(self, shape, generator) -> torch.Tensor:
        k = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), int(torch.Size(shape).numel()),
                              replacement=True, generator=generator).reshape(shape)
        m = torch.tensor(self.means, dtype=torch.float64)[k]
        return m + self.std * torch.randn(shape, generator=generator, dtype=torch.float64)

    def posterior_mean(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """E[x0 | x_t = alpha x0 + sigma eps] (a loop over the few modes keeps every op elementwise)."""
        x = x.double()
        var = alpha**2 * self.std**2 + sigma**2
        gain = alpha * self.std**2 / var
        logits = [math.log(w) - 0.5 * (x - alpha * m) ** 2 / var for m, w in zip(self.means, self.weights)]
        top = torch.stack(logits).amax(0)
        # Clamp before exp: denormal floats from far-away modes make CPU arithmetic ~100x slower.
        resp = [torch.exp((lg - top).clamp_min(-60.0)) for lg in logits]
        total = sum(resp)
        return sum(r * (m + gain * (x - alpha * m)) for r, m in zip(resp, self.means)) / total

    def nearest_mode(self, x: torch.Tensor) -> torch.Tensor:
        return (x.unsqueeze(-1) - torch.tensor(self.means, dtype=x.dtype)).abs().argmin(-1)


@dataclass(frozen=True)
class QuantError:
    """e = gain * u_fp + bias + sqrt(V) z with fresh z at every call (PTQD's error model: correlated part,
    constant bias, noise).

    V depends on the model input's noise level s in [0, 1] (VP sigma, or t for flow models) and
    grows from var_min at pure noise to var_max at the clean end, as the paper's Fig. 3 shows.
    """

    gain: float = 0.0
    bias: float = 0.0
    var_min: float = 0.005
    var_max: float = 0.1
    power: float = 3.0

    def variance(self, noise_level: float) -> float:
        return self.var_min + (self.var_max - self.var_min) * (1.0 - noise_level) ** self.power


# The regimes: pure noise (what Q-Drift models), correlated + biased + the same noise (what PTQD, D^2-DPM
# and cumulative compensation model), and biased + the same noise (a systematic shift, no correlated part).
SETTINGS = {"noise": QuantError(), "correlated": QuantError(gain=0.02, bias=0.01), "biased": QuantError(bias=0.01)}


class ExactDenoiser:
    """Closed-form model output (epsilon, v or flow velocity) for a scheduler's current step."""

    def __init__(self, data: Mixture, scheduler, error: QuantError | None = None, generator=None):
        self.data, self.error, self.generator = data, error, generator
        sched = schedule_of(scheduler)
        self.kind = sched.kind
        a, s = sched.alpha_i, sched.sigma_i
        if sched.kind in ("euler", "euler_a"):  # VE latents; the model sees x / sqrt(1 + sigma^2)
            a, s = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
        self.alpha, self.sigma = a.tolist(), s.tolist()
        self.level = self.sigma  # in [0, 1] for VP (alpha^2 + sigma^2 = 1) and flow (sigma = t) inputs
        self.prediction = getattr(scheduler.config, "prediction_type", None) or "flow_prediction"
        if sched.kind == "flow_euler":
            self.prediction = "flow_prediction"
        self.timesteps = scheduler.timesteps

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        i = int((self.timesteps == t).nonzero()[0])
        a, s = self.alpha[i], self.sigma[i]
        x0 = self.data.posterior_mean(x, a, s)
        eps = (x.double() - a * x0) / s
        if self.prediction == "epsilon":
            u = eps
        elif self.prediction == "flow_prediction":
            u = eps - x0
        else:  # v_prediction
            u = a * eps - s * x0
        if self.error is not None:
            z = torch.randn(x.shape, generator=self.generator, dtype=torch.float64)
            u = u + self.error.gain * u + self.error.bias + self.error.variance(self.level[i]) ** 0.5 * z
        return u.to(x.dtype)


def sample(kind: str, steps: int, x_T: torch.Tensor, data: Mixture, error: QuantError | None = None,
           hook=None, seed: int = 0) -> torch.Tensor:
    """Run one sampler from x_T with the exact (error=None) or quantized denoiser, optionally corrected."""
    sch = wrap_scheduler(scheduler_for(kind), hook)
    sch.set_timesteps(steps)
    noise_gen = torch.Generator().manual_seed(seed)          # the sampler's own noise (Euler ancestral, DDIM eta)
    model = ExactDenoiser(data, sch, error, torch.Generator().manual_seed(seed + 1))
    x = x_T.double() * float(getattr(sch, "init_noise_sigma", 1.0))
    x = x.float()
    kw = {**STEP_ARGS.get(kind, {}), **({"generator": noise_gen} if kind in NOISY else {})}
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        x = sch.step(model(x_in, t), t, x, **kw).prev_sample
    return x


def w1(a: torch.Tensor, b: torch.Tensor) -> float:
    """1-D Wasserstein-1 distance between two equally sized samples (all coordinates pooled)."""
    return float((a.flatten().sort().values.double() - b.flatten().sort().values.double()).abs().mean())


def within_mode_std(x: torch.Tensor, data: Mixture) -> float:
    """RMS distance of samples to the centre of their nearest mode's cluster."""
    x = x.flatten().double()
    k = data.nearest_mode(x)
    dev = torch.zeros_like(x)
    for j in range(len(data.means)):
        sel = k == j
        if sel.any():
            dev[sel] = x[sel] - x[sel].mean()
    return float(dev.pow(2).mean().sqrt())


VARIANTS = ("fp", "quant", "qdrift_paper", "qdrift_exact", "qdrift_plus", "ptqd", "d2dpm", "d2dpm_stochastic",
            "cumcomp")


def plus_options() -> dict:
    """Q-Drift+'s settings as shipped (conf/corrector/qdrift_plus.yaml), with the tuned values of a setting
    not tuned (conf/tuned.yaml's default): the testbed is none of the bench settings."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from qdrift.config import tuned_table

    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "corrector" / "qdrift_plus.yaml").qdrift_plus
    options = {k: v for k, v in OmegaConf.to_container(conf).items() if k not in ("kind", "pooling")}
    return options | tuned_table()["qdrift_plus"]["default"]


def correctors(pool, num_runs: int) -> dict:
    """Every corrector with its config's pooling (conf/corrector/*.yaml)."""
    scalar, channel = pool.fit(num_runs, "scalar"), pool.fit(num_runs, "channel")
    return {
        "qdrift_paper": make_corrector("qdrift", scalar, mode="paper"),
        "qdrift_exact": make_corrector("qdrift", scalar, mode="exact"),
        "qdrift_plus": make_corrector("qdrift", channel, **plus_options()),
        "ptqd": make_corrector("ptqd", channel),
        "d2dpm": make_corrector("d2dpm", scalar),
        "d2dpm_stochastic": make_corrector("d2dpm", scalar, variant="stochastic"),
        "cumcomp": make_corrector("cumcomp", channel),
    }


def mean_error_map(kind: str, steps: int, data: Mixture = Mixture(), error: QuantError = QuantError(),
                   runs: int = 64, seed: int = 0, shape=(4, 4)) -> torch.Tensor:
    """Q-Drift+'s mean error map (error_map.py) of `runs` teacher-forced runs whose latents have the
    evaluation samples' shape, from noise and error draws of their own."""
    sch = scheduler_for(kind)
    sch.set_timesteps(steps)
    fp_model = ExactDenoiser(data, sch)
    q_model = ExactDenoiser(data, sch, error, torch.Generator().manual_seed(seed + 23))
    latents = torch.randn((runs, 1, *shape), generator=torch.Generator().manual_seed(seed + 29))
    acc = ErrorMapAccumulator(steps)
    with torch.random.fork_rng():   # Euler ancestral's steps draw from the global generator
        torch.manual_seed(seed + 31)
        teacher_force(fp_model, q_model, sch, latents, steps, acc)
    return acc.sums().shrunk_mean()


def run(kind: str, steps: int = 50, num_samples: int = 4096, num_runs: int = 5, seed: int = 0,
        data: Mixture = Mixture(), error: QuantError = QuantError(), make_correctors=correctors,
        ) -> dict[str, dict[str, float]]:
    """Calibrate on `num_runs` paired runs, then sample every variant from the same initial noise.
    `make_correctors(pool, num_runs)` gives the corrected variants by name (default: every corrector)."""
    shape = (num_samples, 1, 4, 4)
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(shape, generator=gen)
    truth = data.sample(shape, gen)
    # Calibration: the real paired-moment code, runs disjoint from the evaluation noise (DDIM with eta
    # calibrates on the deterministic DDIM trajectory: the statistics are per step, not per noise draw).
    cal_sched = scheduler_for(kind)
    cal_sched.set_timesteps(steps)
    fp_model = ExactDenoiser(data, cal_sched)
    q_model = ExactDenoiser(data, cal_sched, error, torch.Generator().manual_seed(seed + 7))
    latents = torch.randn((num_runs, 1, 16, 16), generator=torch.Generator().manual_seed(seed + 11))
    with torch.random.fork_rng():   # Euler ancestral's calibration steps draw from the global generator
        torch.manual_seed(seed + 13)
        pool = calibrate_denoisers(fp_model, q_model, scheduler_for(kind), latents, steps, trim_std=4.0)
    hooks = {"fp": None, "quant": None, **make_correctors(pool, num_runs)}
    out = {}
    fp = sample(kind, steps, x_T, data, None, None, seed + 3)
    for name, hook in hooks.items():
        x = fp if name == "fp" else sample(kind, steps, x_T, data, error, hook, seed + 3)
        out[name] = {
            "w1_to_fp": w1(x, fp),
            "w1_to_data": w1(x, truth),
            "mode_std": within_mode_std(x, data),
        }
    out["data"] = {"w1_to_fp": w1(truth, fp), "w1_to_data": 0.0, "mode_std": within_mode_std(truth, data)}
    return out
