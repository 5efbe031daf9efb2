"""Sampling-time correctors for quantized denoisers, as scheduler hooks.

- `QDrift`: rescale each step's update by the drift that pairs with the residual noise
  (method.md sections 2-4, 7), optionally after removing the conditional bias E[e | u].
- `PTQD`: undo the correlated error, u_fp ~ (u - b) / (1 + k); on stochastic samplers also shrink
  the sampler's noise by the remaining residual variance.
- `D2DPM`: subtract E[e | u] from the joint Gaussian of (u, e); on stochastic samplers also
  absorb the residual variance into the sampler's noise.
All three read the same `DriftStatistics` and keep the wrapped scheduler's `step` signature.
"""
from __future__ import annotations

import torch

from .hooks import StepHook
from .layout import broadcastable, check_layout
from .rules import Coefficients, Schedule, ancestral_noise_scale, coefficients, schedule_of
from .statistics import DriftStatistics, StatisticsMismatch


class Corrector(StepHook):
    """Shared mechanics: an output transform, step coefficients and ancestral noise scaling."""

    def __init__(self, stats: DriftStatistics, layout: str = "image"):
        check_layout(layout)
        self.stats = stats
        self.layout = layout
        self.schedule: Schedule | None = None
        self.coef: Coefficients | None = None
        self.noise_scale: torch.Tensor | None = None

    # --- per-trajectory preparation -------------------------------------------------------
    def prepare(self, scheduler) -> None:
        self.schedule = schedule_of(scheduler)
        self._check_trajectory(scheduler)
        self.coef = self.step_coefficients(self.schedule)
        self.noise_scale = self.ancestral_scale(self.schedule)

    def _check_trajectory(self, scheduler) -> None:
        steps = self.schedule.num_steps
        if steps != self.stats.num_steps:
            raise StatisticsMismatch(
                f"statistics were calibrated for {self.stats.num_steps} steps, the sampler runs {steps}")
        expected = self.stats.manifest.get("timesteps")
        if expected is not None:
            got = scheduler.timesteps.double().cpu()
            if len(expected) != len(got) or not torch.allclose(torch.tensor(expected, dtype=torch.float64), got,
                                                               rtol=1e-5, atol=1e-4):
                raise StatisticsMismatch("statistics were calibrated on other timesteps than the sampler uses "
                                         f"(calibrated {expected[:3]}..., running {got[:3].tolist()}...)")

    def step_coefficients(self, schedule: Schedule) -> Coefficients:
        return Coefficients.identity(self.stats.num_steps, self.stats.s_ee.shape[1])

    def ancestral_scale(self, schedule: Schedule) -> torch.Tensor | None:
        return None

    def transform_output(self, i: int, u: torch.Tensor) -> torch.Tensor:
        return u

    # --- the step ---------------------------------------------------------------------------
    def _vec(self, table: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
        return broadcastable(table[i].float(), like, self.layout)

    def step(self, scheduler, i, model_output, sample, parent, step_kwargs):
        if self.coef is None:
            raise RuntimeError("the corrector was not prepared: call scheduler.set_timesteps first")
        u = self.transform_output(i, model_output)
        out_i = self.coef.out[i]
        if not torch.all(out_i == 1):
            u = (u.float() * self._vec(self.coef.out, i, u)).to(model_output.dtype)
        base = parent(u).prev_sample
        if self.noise_scale is not None and not torch.all(self.noise_scale[i] == 1):
            base = self._scale_ancestral_noise(i, base, u, sample)
        p, q = self.coef.p[i], self.coef.q[i]
        if (torch.all(p == 1) and torch.all(q == 0)) or step_kwargs.get("eta", 0.0) > 0:
            return base  # nothing to do (bit-identical to the wrapped scheduler), or DDIM with its own noise
        mixed = self._vec(self.coef.p, i, base) * base.float() + self._vec(self.coef.q, i, base) * sample.float()
        return mixed.to(base.dtype)

    def _scale_ancestral_noise(self, i, base, u, sample):
        """Euler ancestral: split the result into its deterministic part and the sampler's noise, shrink the noise."""
        s = self.schedule
        det = sample.float() + (float(s.sigma_n[i]) - float(s.sigma_i[i])) * u.float()
        noise = base.float() - det
        return (det + noise * self._vec(self.noise_scale, i, base)).to(base.dtype)

    # --- helpers ---------------------------------------------------------------------------
    def _conditional_bias(self, i: int, u: torch.Tensor) -> torch.Tensor:
        """E[e | u] = mu_e + (s_ue / s_uu)(u - mu_u), per step (and channel)."""
        st = self.stats
        mu_u, mu_e, slope = (self._vec(t, i, u) for t in (st.mu_u, st.mu_e, st.regression_slope))
        return mu_e + slope * (u.float() - mu_u)


class QDrift(Corrector):
    """Q-Drift: per-step drift rescaling from V_i (mode "paper" or "exact"), optional bias removal."""

    def __init__(self, stats: DriftStatistics, layout: str = "image", mode: str = "paper",
                 drift_scale: float = 1.0, bias_removal: bool = False):
        super().__init__(stats, layout)
        if drift_scale < 0:
            raise ValueError(f"drift_scale must be >= 0, got {drift_scale}")
        self.mode, self.drift_scale, self.bias_removal = mode, float(drift_scale), bool(bias_removal)
        if mode not in ("paper", "exact"):
            raise ValueError(f"unknown Q-Drift mode {mode!r}; choose 'paper' or 'exact'")

    def step_coefficients(self, schedule: Schedule) -> Coefficients:
        return coefficients(schedule, self.stats.residual_var, self.mode).scaled(self.drift_scale)

    def transform_output(self, i, u):
        if not self.bias_removal:
            return u
        return (u.float() - self._conditional_bias(i, u)).to(u.dtype)

    def drift_factors(self) -> torch.Tensor:
        """c_i per step (and channel): the relative change of each step's update (for plots and logs)."""
        if self.coef is None:
            raise RuntimeError("call scheduler.set_timesteps first")
        return torch.where(self.coef.out != 1, self.coef.out - 1, self.coef.p - 1)


class PTQD(Corrector):
    """PTQD: e = k u_fp + b + r; correct with (u - b) / (1 + k)."""

    def __init__(self, stats: DriftStatistics, layout: str = "image"):
        super().__init__(stats, layout)
        st = stats
        s_ff = st.s_uu - 2 * st.s_ue + st.s_ee            # Var(u_fp), u_fp = u - e
        s_ef = st.s_ue - st.s_ee                          # Cov(e, u_fp)
        self.k = torch.where(s_ff > 0, s_ef / s_ff.clamp_min(1e-300), torch.zeros_like(s_ff))
        self.b = st.mu_e - self.k * (st.mu_u - st.mu_e)
        resid = (st.s_ee - self.k * s_ef).clamp_min(0)
        self.residual = resid / (1 + self.k) ** 2          # what is left after the linear correction

    def transform_output(self, i, u):
        k, b = self._vec(self.k, i, u), self._vec(self.b, i, u)
        return ((u.float() - b) / (1 + k)).to(u.dtype)

    def ancestral_scale(self, schedule):
        return ancestral_noise_scale(schedule, self.residual)


class D2DPM(Corrector):
    """D^2-DPM: subtract E[e | u]; stochastic samplers also absorb the residual into their noise."""

    def transform_output(self, i, u):
        return (u.float() - self._conditional_bias(i, u)).to(u.dtype)

    def ancestral_scale(self, schedule):
        return ancestral_noise_scale(schedule, self.stats.residual_var)


CORRECTORS = {"qdrift": QDrift, "ptqd": PTQD, "d2dpm": D2DPM}
# Code version of each corrector's rules (rules.py included): bump when a change alters its images.
CORRECTOR_VERSIONS = {"qdrift": 1, "ptqd": 1, "d2dpm": 1}


def make_corrector(kind: str, stats: DriftStatistics, layout: str = "image", **options) -> Corrector:
    """A corrector by config name (`corrector.<variant>.kind`)."""
    if kind not in CORRECTORS:
        raise ValueError(f"unknown corrector {kind!r}; known: {sorted(CORRECTORS)}")
    return CORRECTORS[kind](stats, layout, **options)
