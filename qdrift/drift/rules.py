"""Per-sampler Q-Drift rules (method.md sections 4 and 7).

Step i moves x_i at noise level (alpha_i, sigma_i) to x_n at (alpha_n, sigma_n). A rule turns
the residual variance V_i of the raw model output into step coefficients:

    deterministic samplers:  x_n' = p_i * x_n + q_i * x_i   (x_n: the wrapped scheduler's result)
    Euler ancestral:         the model output is scaled by out_i, which scales only the
                             deterministic part of the step; the sampler's own noise is untouched.

Every deterministic first-order step is a DDIM step x_n = alpha_n x0 + sigma_n eps with
eps = (x_i - alpha_i x0) / sigma_i, and DPM-Solver++ 2M is one with an effective x0 that mixes
this step's and the previous step's data predictions. Both rules only need, per step, the
variance W_i that the quantization residual puts on that effective x0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

MODES = ("paper", "exact")
# What a rule does at steps where no sigma' preserves the marginal, per mode; the first is the default.
# exact: leave the step | land as close as it can | shrink the output by E[e | u]'s slope instead (no drift
# reduces the variance there; correctors.QDrift). paper: apply the authors' rule anyway | feasible_only,
# an ablation that leaves those steps (a name of its own: "skip" with the paper rule once meant the rule itself).
INFEASIBLE = {"exact": ("skip", "closest", "shrink"), "paper": ("apply", "feasible_only")}


def infeasible_choice(mode: str, infeasible: str | None) -> str:
    """`infeasible` checked against `mode`'s choices; None gives the mode's default."""
    if mode not in MODES:
        raise ValueError(f"unknown Q-Drift mode {mode!r}; choose one of {MODES}")
    choices = INFEASIBLE[mode]
    if infeasible is None:
        return choices[0]
    if infeasible not in choices:
        raise ValueError(f"infeasible={infeasible!r} is not a choice of the {mode} rule; choose one of {choices}")
    return infeasible


@dataclass(frozen=True)
class Schedule:
    """Noise levels and output-to-x0 gains of one trajectory, each (S,) float64."""

    kind: str                 # euler | euler_a | flow_euler | dpmpp | ddim
    alpha_i: torch.Tensor
    sigma_i: torch.Tensor
    alpha_n: torch.Tensor
    sigma_n: torch.Tensor     # the level the deterministic part lands on (sigma_down for Euler ancestral)
    x0_gain: torch.Tensor     # B_i = d x0_hat / d u: how an output error moves the data prediction
    weights: torch.Tensor     # (S, 2): effective x0 = a0 * x0_hat(step i) + a1 * x0_hat(step i-1)
    sigma_up: torch.Tensor    # ancestral noise added after the deterministic part (zeros elsewhere)
    stochastic: bool          # the sampler injects its own noise in a way no drift rule covers

    @property
    def num_steps(self) -> int:
        return self.sigma_i.shape[0]


def sampler_kind(scheduler) -> str:
    # Order matters: the ancestral class is not a subclass of EulerDiscrete, but be explicit anyway.
    for cls, kind in (
        (EulerAncestralDiscreteScheduler, "euler_a"),
        (EulerDiscreteScheduler, "euler"),
        (FlowMatchEulerDiscreteScheduler, "flow_euler"),
        (DPMSolverMultistepScheduler, "dpmpp"),
        (DDIMScheduler, "ddim"),
    ):
        if isinstance(scheduler, cls):
            return kind
    raise NotImplementedError(
        f"no Q-Drift rule for {type(scheduler).__name__}; supported: Euler, Euler ancestral, "
        "flow-matching Euler, DPM-Solver++ (multistep, data prediction) and DDIM"
    )


def schedule_of(scheduler) -> Schedule:
    """Read one trajectory's levels from a scheduler after `set_timesteps`."""
    kind = sampler_kind(scheduler)
    prediction = getattr(scheduler.config, "prediction_type", "flow_prediction") or "flow_prediction"
    if kind == "flow_euler":
        prediction = "flow_prediction"
    stochastic = False
    if kind in ("euler", "euler_a"):
        if prediction != "epsilon":
            raise NotImplementedError(f"Q-Drift for {kind} supports epsilon prediction, not {prediction}")
        s = scheduler.sigmas.double().cpu()
        sig_i, sig_n = s[:-1], s[1:]
        alpha_i = alpha_n = torch.ones_like(sig_i)
        sigma_up = torch.zeros_like(sig_i)
        if kind == "euler_a":
            sigma_up = (sig_n**2 * (sig_i**2 - sig_n**2) / sig_i**2).clamp_min(0).sqrt()
            sig_n = (sig_n**2 - sigma_up**2).clamp_min(0).sqrt()
    elif kind == "flow_euler":
        s = scheduler.sigmas.double().cpu()
        sig_i, sig_n = s[:-1], s[1:]
        alpha_i, alpha_n = 1 - sig_i, 1 - sig_n
        sigma_up = torch.zeros_like(sig_i)
        stochastic = bool(getattr(scheduler.config, "stochastic_sampling", False))
    elif kind == "dpmpp":
        algo = scheduler.config.algorithm_type
        if algo not in ("dpmsolver++", "sde-dpmsolver++"):
            raise NotImplementedError(f"Q-Drift for DPM-Solver needs data prediction (dpmsolver++), not {algo}")
        if scheduler.config.solver_order > 2:
            raise NotImplementedError("Q-Drift supports DPM-Solver++ of order 1 and 2 (2M), not 3")
        s = scheduler.sigmas.double().cpu()
        alpha, sigma = scheduler._sigma_to_alpha_sigma_t(s)
        alpha_i, alpha_n, sig_i, sig_n = alpha[:-1], alpha[1:], sigma[:-1], sigma[1:]
        sigma_up = torch.zeros_like(sig_i)
        stochastic = algo == "sde-dpmsolver++"
    else:  # ddim
        t = scheduler.timesteps.cpu().long()
        prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        acp = scheduler.alphas_cumprod.double().cpu()
        a_i = acp[t]
        a_n = torch.where(prev >= 0, acp[prev.clamp_min(0)], torch.as_tensor(float(scheduler.final_alpha_cumprod)).double())
        alpha_i, alpha_n, sig_i, sig_n = a_i.sqrt(), a_n.sqrt(), (1 - a_i).sqrt(), (1 - a_n).sqrt()
        sigma_up = torch.zeros_like(sig_i)
    if prediction == "epsilon":
        gain = -sig_i / alpha_i
    elif prediction in ("v_prediction", "flow_prediction"):
        gain = -sig_i  # VP v-prediction: x0 = alpha x - sigma v; flow: x0 = x - sigma v
    else:
        raise NotImplementedError(f"Q-Drift does not support prediction type {prediction!r}")
    weights = _dpmpp_weights(scheduler, alpha_i, sig_i, alpha_n, sig_n) if kind == "dpmpp" else None
    if weights is None:
        weights = torch.stack([torch.ones_like(sig_i), torch.zeros_like(sig_i)], -1)
    return Schedule(kind, alpha_i, sig_i, alpha_n, sig_n, gain, weights, sigma_up, stochastic)


def _dpmpp_weights(scheduler, alpha_i, sig_i, alpha_n, sig_n) -> torch.Tensor:
    """Weights of this and the previous data prediction in each DPM-Solver++ step.

    Mirrors diffusers' order selection (first order at the start and, with lower_order_final /
    euler_at_final / final_sigmas_type="zero", at the end) and its 2M update
    x_n = (sigma_n / sigma_i) x_i - alpha_n (e^-h - 1) (D0 + k D1), D1 = (m0 - m1) / r0.
    """
    cfg = scheduler.config
    num = sig_i.shape[0]
    lam = torch.log(alpha_i) - torch.log(sig_i)
    lam_n = torch.log(alpha_n) - torch.log(sig_n)
    w = torch.zeros(num, 2, dtype=torch.float64)
    for i in range(num):
        lower_order_nums = min(i, cfg.solver_order)
        final = i == num - 1 and (cfg.euler_at_final or (cfg.lower_order_final and num < 15)
                                  or cfg.final_sigmas_type == "zero")
        if cfg.solver_order == 1 or lower_order_nums < 1 or final:
            w[i] = torch.tensor([1.0, 0.0])
            continue
        h = lam_n[i] - lam[i]
        r0 = (lam[i] - lam[i - 1]) / h
        if cfg.solver_type == "midpoint":
            k = torch.tensor(0.5, dtype=torch.float64)
        else:  # heun
            k = ((torch.exp(-h) - 1) / h + 1) / (1 - torch.exp(-h))
        w[i] = torch.stack([1 + k / r0, -k / r0])
    return w


def x0_variance(schedule: Schedule, V: torch.Tensor) -> torch.Tensor:
    """W_i: variance the residual puts on step i's effective data prediction (errors independent across steps)."""
    g2 = schedule.x0_gain.unsqueeze(-1) ** 2
    a = schedule.weights
    this = a[:, :1] ** 2 * g2 * V
    prev = torch.zeros_like(this)
    prev[1:] = a[1:, 1:] ** 2 * (g2 * V)[:-1]
    return this + prev


@dataclass
class Coefficients:
    """Per-step correction, each (S, C): x_n' = p x_n + q x_i, model output scaled by `out`."""

    p: torch.Tensor
    q: torch.Tensor
    out: torch.Tensor

    def scaled(self, drift_scale: float | torch.Tensor) -> "Coefficients":
        """Each step's change from the identity times drift_scale (a number, or (S, 1) per step)."""
        s = drift_scale if isinstance(drift_scale, torch.Tensor) else float(drift_scale)
        return Coefficients(1 + s * (self.p - 1), s * self.q, 1 + s * (self.out - 1))

    @classmethod
    def identity(cls, num_steps: int, channels: int) -> "Coefficients":
        one = torch.ones(num_steps, channels, dtype=torch.float64)
        return cls(one.clone(), torch.zeros_like(one), one.clone())


def coefficients(schedule: Schedule, V: torch.Tensor, mode: str = "paper", infeasible: str | None = None) -> Coefficients:
    """Step coefficients for residual variance V (S, C) under `mode` (paper | exact); `infeasible` is the
    choice at steps where no sigma' preserves the marginal (INFEASIBLE[mode], default its first)."""
    infeasible = infeasible_choice(mode, infeasible)
    if V.shape[0] != schedule.num_steps:
        raise ValueError(f"statistics have {V.shape[0]} steps, the sampler runs {schedule.num_steps}")
    V = V.double().clamp_min(0)
    if schedule.stochastic:
        return Coefficients.identity(*V.shape)  # stochastic samplers: bias removal only (method.md section 4)
    if mode == "exact":
        return _exact(schedule, V, infeasible)
    out = _paper(schedule, V)
    if infeasible == "feasible_only":
        keep = feasible_steps(schedule, V)
        out = Coefficients(torch.where(keep, out.p, 1.0), torch.where(keep, out.q, 0.0), torch.where(keep, out.out, 1.0))
    return out


def feasible_steps(schedule: Schedule, V: torch.Tensor) -> torch.Tensor:
    """(S, C) bool: steps where some sigma' >= 0 keeps the marginal (the exact rule's quadratic has a root)."""
    a_i, s_i, a_n, s_n = _levels(schedule)
    W = x0_variance(schedule, V.double().clamp_min(0))
    return s_n**2 * (1 + (a_i / s_i) ** 2 * W) - a_n**2 * W >= 0


def _levels(schedule: Schedule):
    col = lambda t: t.unsqueeze(-1)  # noqa: E731 - (S,) -> (S, 1) to broadcast over channels
    return col(schedule.alpha_i), col(schedule.sigma_i), col(schedule.alpha_n), col(schedule.sigma_n)


def _paper(schedule: Schedule, V: torch.Tensor) -> Coefficients:
    """The authors' rules: c_i = |d sigma| V / (2 sigma) for the Euler family, and for DPM-Solver++
    (and DDIM) the variance injected in y = x / alpha over the change of sigma_bar^2."""
    a_i, s_i, a_n, s_n = _levels(schedule)
    out = Coefficients.identity(*V.shape)
    if schedule.kind in ("euler", "euler_a", "flow_euler"):
        c = (s_n - s_i).abs() * V / (2 * s_i)
        if schedule.kind == "euler_a":
            out.out = 1 + c
        else:
            out.p, out.q = 1 + c, -c
        return out
    coef = a_n - s_n * a_i / s_i                      # weight of the effective x0 in x_n
    var_y = coef**2 * x0_variance(schedule, V) / a_n**2
    # At alpha_i = 0 (flow models' first step) sigma_bar_i is infinite: no correction.
    finite = a_i > 0
    sbar_i2 = (s_i / a_i.clamp_min(1e-300)) ** 2
    beta = torch.where(finite, var_y / (sbar_i2 - (s_n / a_n) ** 2), torch.zeros_like(var_y))
    out.p = 1 + beta
    out.q = torch.where(finite, -beta * a_n / a_i.clamp_min(1e-300), torch.zeros_like(beta))  # y_n' = y_i + (1+beta)(y_n - y_i)
    return out


def _exact(schedule: Schedule, V: torch.Tensor, infeasible: str) -> Coefficients:
    """Marginal-preserving rule (method.md section 7): land on sigma' with sigma'^2 + eta^2 = sigma_n^2,
    where eta^2 = (alpha_n - sigma' alpha_i / sigma_i)^2 W is the residual noise the step itself injects
    (a quadratic in sigma'). Where no sigma' >= 0 solves it (late steps with a large W), "skip" (and
    "shrink", whose correction is on the model output) leaves the step uncorrected (method.md), and
    "closest" takes the sigma' that minimises sigma'^2 + eta^2, the vertex of the quadratic: the
    smallest total variance the step can reach, still above sigma_n^2."""
    a_i, s_i, a_n, s_n = _levels(schedule)
    out = Coefficients.identity(*V.shape)
    W = x0_variance(schedule, V)
    rho = a_i / s_i
    disc = s_n**2 * (1 + rho**2 * W) - a_n**2 * W
    feasible = (disc >= 0) & (W > 0)            # feasible_steps, where the step has a residual at all
    if infeasible == "closest":
        feasible = W > 0
    s_new = (a_n * rho * W + disc.clamp_min(0).sqrt()) / (1 + rho**2 * W)
    s_new = torch.where(feasible, s_new, s_n.expand_as(s_new))
    if schedule.kind == "euler_a":
        out.out = (s_i - s_new) / (s_i - s_n)
        return out
    # x_n' = x_n + (sigma' - sigma_n) eps_hat, eps_hat recovered from x_i and x_n.
    k = (s_new - s_n) / (a_n * s_i - a_i * s_n)
    out.p, out.q = 1 - k * a_i, k * a_n
    return out


def ancestral_noise_scale(schedule: Schedule, residual: torch.Tensor) -> torch.Tensor:
    """sigma_up' / sigma_up so that the ancestral noise plus the residual's keeps the step's variance."""
    if schedule.kind != "euler_a":
        return torch.ones_like(residual, dtype=torch.float64)
    up = schedule.sigma_up.unsqueeze(-1)
    dt = (schedule.sigma_n - schedule.sigma_i).unsqueeze(-1)
    reduced = (up**2 - dt**2 * residual.double()).clamp_min(0).sqrt()
    return torch.where(up > 0, reduced / up.clamp_min(1e-300), torch.ones_like(reduced))


def ddim_noise_std(schedule: Schedule, eta: float, residual: torch.Tensor, prediction: str):
    """DDIM with eta > 0: the std of the noise each step adds, (S, 1), and the reduced one, (S, C), that
    absorbs a residual of variance `residual` (S, C) on the model output (PTQD's and D^2-DPM's
    variance-schedule calibration).

    The step is x_n = sqrt(a_n) x0 + sqrt(1 - a_n - std^2) eps + std z with
    std = eta * sqrt((1 - a_n)/(1 - a_i) (1 - a_i/a_n)); the residual reaches x_n through
    c = dx_n/du = sqrt(a_n) dx0/du + sqrt(1 - a_n - std^2) deps/du. Keeping the deterministic part and
    adding std' z with std'^2 = max(std^2 - c^2 r, 0) keeps the step's variance. (Recomputing the
    direction term for std', as the authors' code does, would not: every DDIM eta has the same marginals.)
    """
    if schedule.kind != "ddim":
        raise ValueError(f"eta is DDIM's noise argument, not {schedule.kind}'s")
    a_i, s_i, a_n, s_n = _levels(schedule)
    std = eta * (s_n**2 / s_i**2 * (1 - a_i**2 / a_n**2)).clamp_min(0).sqrt()
    eps_gain = torch.ones_like(a_i) if prediction == "epsilon" else a_i   # v-prediction: eps = alpha v + sigma x
    c = a_n * schedule.x0_gain.unsqueeze(-1) + (s_n**2 - std**2).clamp_min(0).sqrt() * eps_gain
    return std, (std**2 - c**2 * residual.double()).clamp_min(0).sqrt()
