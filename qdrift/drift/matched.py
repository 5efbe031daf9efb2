"""Matched drift: Q-Drift's drift with its size measured instead of modelled (README, "Beyond the paper").

The drift rules size each step's drift from V_i, assuming the quantization errors of successive steps
are independent. They are not: on the embedded default consecutive steps' errors correlate at about
0.5, so the quantized trajectory's latent variance grows to 1.6x the FP trajectory's at mid steps, and
the exact rule takes it down to only 1.3x (README). Here the drift is fitted instead: over R paired
calibration runs, closed loop, step i lands on the sigma' whose result has the FP trajectory's latent
variance at step i + 1 (per channel, or pooled), i.e. x_n' = x_n + delta_i * eps_hat, with eps_hat
the step's own noise estimate. A step of any deterministic sampler moves along (x0_hat, eps_hat), so
eps_hat follows from x_i and x_n alone: x_n - x_i = (alpha_n - alpha_i) x0_hat + (sigma_n - sigma_i) eps_hat.
The variance of x_n + delta eps_hat is a quadratic in delta; delta is its root closest to 0 (the
smallest change that matches). Where no delta reaches the target the step is left alone, as the exact
rule leaves its infeasible steps; so is a step whose trajectory has less variance than the FP one. No
extra model evaluation at sampling time.
"""
from __future__ import annotations

import torch

from .correctors import Corrector
from .hooks import StepHook
from .layout import broadcastable, by_channel
from .rules import schedule_of
from .statistics import DriftStatistics

FIT_POOLINGS = ("channel", "scalar")


def channel_moments(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (unbiased) variance over runs and positions, float64, each (C,)."""
    v = by_channel(x.detach().double(), layout)
    return v.mean(dim=(0, 2)), v.var(dim=(0, 2))


def solve_delta(var_a: torch.Tensor, cov_ab: torch.Tensor, var_b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """delta with Var(a + delta b) = target, the root closest to 0; 0 where no delta reaches the target
    or b does not vary."""
    disc = cov_ab**2 - var_b * (var_a - target)
    safe = var_b.clamp_min(1e-300)
    root = disc.clamp_min(0).sqrt()
    lo, hi = (-cov_ab - root) / safe, (-cov_ab + root) / safe
    delta = torch.where(lo.abs() < hi.abs(), lo, hi)
    return torch.where((disc >= 0) & (var_b > 0), delta, torch.zeros_like(delta))


class TargetRecorder(StepHook):
    """The FP trajectory's per-channel latent variance after each step: (S, C) float64."""

    def __init__(self, layout: str = "image"):
        self.layout = layout
        self.var: dict[int, torch.Tensor] = {}

    def step(self, scheduler, i, model_output, sample, parent, step_kwargs):
        out = parent(model_output).prev_sample
        self.var[i] = channel_moments(out, self.layout)[1].cpu()
        return out

    def table(self, num_steps: int) -> torch.Tensor:
        missing = [i for i in range(num_steps) if i not in self.var]
        if missing:
            raise RuntimeError(f"the FP runs did not reach steps {missing}")
        return torch.stack([self.var[i] for i in range(num_steps)])


class MatchedDrift(Corrector):
    """x_n' = x_n + delta[i] * eps_hat, delta (S, C) fitted on `runs` closed-loop calibration runs
    (`fit`, stages/match.py); `stats` only checks that the sampler runs the calibrated steps."""

    def __init__(self, stats: DriftStatistics, layout: str = "image", runs: int = 64, mean_removal: float = 0.0):
        super().__init__(stats, layout)
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 2:
            raise ValueError(f"runs: the matched drift needs at least 2 calibration runs to fit a variance, got {runs!r}")
        if not 0 <= float(mean_removal) <= 1:
            raise ValueError(f"mean_removal is the fraction of the mean error removed, in [0, 1], got {mean_removal}")
        self.runs, self.mean_removal = runs, float(mean_removal)
        self.shrunk_mean = stats.shrunk_mean_error() if self.mean_removal else None
        self.delta: torch.Tensor | None = None
        self._fit: dict | None = None

    def prepare(self, scheduler) -> None:
        schedule = schedule_of(scheduler)
        if schedule.stochastic or schedule.kind == "euler_a":
            raise NotImplementedError(f"the matched drift needs a deterministic sampler; {schedule.kind} adds its own noise")
        super().prepare(scheduler)

    # --- fitting (closed loop over the calibration runs, all in one batch) ------------------
    def start_fit(self, target: torch.Tensor, pooling: str = "channel") -> None:
        """Fit delta step by step on the next trajectory, so that its latent variance follows `target` (S, C)."""
        if pooling not in FIT_POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r} for the matched drift; choose one of {list(FIT_POOLINGS)}")
        self._fit = {"target": target.double(), "pooling": pooling, "delta": {}}

    def finish_fit(self) -> torch.Tensor:
        fit, self._fit = self._fit, None
        steps = fit["target"].shape[0]
        missing = [i for i in range(steps) if i not in fit["delta"]]
        if missing:
            raise RuntimeError(f"the matched-drift fit did not reach steps {missing}")
        self.delta = torch.stack([fit["delta"][i] for i in range(steps)])
        return self.delta

    def use(self, delta: torch.Tensor) -> "MatchedDrift":
        if delta.ndim != 2 or delta.shape[0] != self.stats.num_steps or delta.shape[1] not in (1, self.stats.s_ee.shape[1]):
            raise ValueError(f"a matched-drift fit of shape {tuple(delta.shape)} does not fit {self.stats.num_steps} "
                             f"steps and {self.stats.s_ee.shape[1]} channels")
        if not torch.isfinite(delta).all():
            raise ValueError("the matched-drift fit has non-finite values")
        self.delta = delta.double()
        return self

    def _fit_step(self, i: int, base: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a, b = by_channel(base.double(), self.layout), by_channel(eps.double(), self.layout)
        n = a.shape[0] * a.shape[2]
        if n < 2:
            raise ValueError("the matched-drift fit needs at least 2 values per channel")
        da, db = a - a.mean(dim=(0, 2), keepdim=True), b - b.mean(dim=(0, 2), keepdim=True)
        var_a, var_b = (da**2).sum(dim=(0, 2)) / (n - 1), (db**2).sum(dim=(0, 2)) / (n - 1)
        cov = (da * db).sum(dim=(0, 2)) / (n - 1)
        target = self._fit["target"][i].to(var_a.device)
        if self._fit["pooling"] == "scalar":   # one delta for the mean of the channels' variances
            var_a, var_b, cov, target = (t.mean(0, keepdim=True) for t in (var_a, var_b, cov, target))
        # Only a drift toward density (delta <= 0), and never past sigma' = 0: a trajectory with less variance
        # than the FP one is left alone (Q-Drift never adds noise), and a small deficit at a late step is
        # mostly the batch's sampling noise.
        sigma_n = float(self.schedule.sigma_n[i])
        delta = solve_delta(var_a, cov, var_b, target)
        delta = torch.where((delta <= 0) & (delta >= -sigma_n), delta, torch.zeros_like(delta))
        self._fit["delta"][i] = delta.cpu()
        return delta

    def transform_output(self, i, u):
        """Q-Drift+'s mean removal (correctors.QDrift): the systematic part, which no drift acts on."""
        if not self.mean_removal:
            return u
        return (u.float() - self.mean_removal * self._vec(self.shrunk_mean, i, u)).to(u.dtype)

    # --- the step ---------------------------------------------------------------------------
    def step(self, scheduler, i, model_output, sample, parent, step_kwargs):
        if self.coef is None:
            raise RuntimeError("the corrector was not prepared: call scheduler.set_timesteps first")
        if float(step_kwargs.get("eta") or 0.0) > 0:
            raise NotImplementedError("the matched drift needs a deterministic sampler; DDIM with eta > 0 adds its own noise")
        base = parent(self.transform_output(i, model_output)).prev_sample
        s = self.schedule
        a_i, s_i, a_n, s_n = (float(t[i]) for t in (s.alpha_i, s.sigma_i, s.alpha_n, s.sigma_n))
        # The step's own noise estimate: solve x_i = a_i x0 + s_i eps, x_n = a_n x0 + s_n eps for eps.
        eps = (a_i * base.float() - a_n * sample.float()) / (a_i * s_n - a_n * s_i)
        if self._fit is not None:
            delta = self._fit_step(i, base, eps)
        elif self.delta is None:
            raise RuntimeError("the matched drift has no fit: run stages.match.matched_drift or call use(delta)")
        else:
            delta = self.delta[i]
        if not torch.any(delta != 0):
            return base
        return (base.float() + broadcastable(delta.float().to(base.device), base, self.layout) * eps).to(base.dtype)
