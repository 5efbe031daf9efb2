"""Sampling-time correctors for quantized denoisers, as scheduler hooks.

- `QDrift`: rescale each step's update by the drift that pairs with the residual noise
  (method.md sections 2-4, 7), optionally after removing the conditional bias E[e | u].
- `PTQD` (He et al., NeurIPS 2023): undo the correlated error, u_fp ~ (u - b) / (1 + k), k from the
  scalar statistics, b per channel; stochastic samplers also shrink their noise by the residual variance.
- `D2DPM` (Zeng et al. 2025): from the joint Gaussian of (u, e), subtract E[e | u] (deterministic
  variant; stochastic samplers absorb Var(e | u) into their noise) or a draw of e | u (stochastic variant).
- `CumComp` (after Liu et al. 2025, arXiv 2508.12094): remove each step's systematic (mean) error where
  it enters, so that no mean deviation accumulates along the trajectory.
All read the same `DriftStatistics` and keep the wrapped scheduler's `step` signature.
"""
from __future__ import annotations

import math
import zlib

import torch
from diffusers.utils.torch_utils import randn_tensor

from .error_map import to_latent
from .hooks import StepHook
from .layout import broadcastable, check_layout
from .rules import (Coefficients, Schedule, ancestral_noise_scale, coefficients, ddim_noise_std, feasible_steps,
                    infeasible_choice, schedule_of)
from .statistics import DriftStatistics, StatisticsMismatch


class Corrector(StepHook):
    """Shared mechanics: an output transform, step coefficients and the sampler's own noise shrunk by the
    variance the corrected output still carries (Euler ancestral's sigma_up, DDIM's eta > 0)."""

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
        absorbed = self.absorbed_variance()
        self.noise_scale = None if absorbed is None else ancestral_noise_scale(self.schedule, absorbed)
        self.prediction = getattr(scheduler.config, "prediction_type", None)

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

    def absorbed_variance(self) -> torch.Tensor | None:
        """(S, C) variance of the error left in the corrected output that stochastic samplers absorb into
        their own noise (None: leave the sampler's noise alone)."""
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
        eta = float(step_kwargs.get("eta") or 0.0)
        if eta > 0:   # DDIM with its own noise: no drift rule covers it, the noise absorbs the residual
            return self._ddim_noisy_step(i, u, eta, parent, step_kwargs)
        base = parent(u).prev_sample
        if self.noise_scale is not None and not torch.all(self.noise_scale[i] == 1):
            base = self._scale_ancestral_noise(i, base, u, sample)
        p, q = self.coef.p[i], self.coef.q[i]
        if torch.all(p == 1) and torch.all(q == 0):
            return base  # nothing to do: bit-identical to the wrapped scheduler
        mixed = self._vec(self.coef.p, i, base) * base.float() + self._vec(self.coef.q, i, base) * sample.float()
        return mixed.to(base.dtype)

    def _scale_ancestral_noise(self, i, base, u, sample):
        """Euler ancestral: split the result into its deterministic part and the sampler's noise, shrink the noise."""
        s = self.schedule
        det = sample.float() + (float(s.sigma_n[i]) - float(s.sigma_i[i])) * u.float()
        noise = base.float() - det
        return (det + noise * self._vec(self.noise_scale, i, base)).to(base.dtype)

    def _ddim_noisy_step(self, i, u, eta, parent, step_kwargs):
        """DDIM, eta > 0: the step on the noise z it would draw itself, then std z -> std' z (rules.ddim_noise_std)."""
        absorbed = self.absorbed_variance()
        if absorbed is None:
            return parent(u).prev_sample
        std, reduced = ddim_noise_std(self.schedule, eta, absorbed, self.prediction)
        if torch.all(reduced[i] == std[i]):
            return parent(u).prev_sample
        noise = step_kwargs.get("variance_noise")
        if noise is None:   # DDIM's own draw, so the generator's stream stays that of the uncorrected sampler
            noise = randn_tensor(u.shape, generator=step_kwargs.get("generator"), device=u.device, dtype=u.dtype)
        base = parent(u, variance_noise=noise, generator=None).prev_sample
        return (base.float() + self._vec(reduced - std, i, base) * noise.float()).to(base.dtype)

    # --- helpers ---------------------------------------------------------------------------
    def _conditional_bias(self, i: int, u: torch.Tensor) -> torch.Tensor:
        """E[e | u] = mu_e + (s_ue / s_uu)(u - mu_u), per step (and channel)."""
        st = self.stats
        mu_u, mu_e, slope = (self._vec(t, i, u) for t in (st.mu_u, st.mu_e, st.regression_slope))
        return mu_e + slope * (u.float() - mu_u)


SHRINK_CENTRES = ("pooled", "channel")   # infeasible=shrink: toward the pooled mean output or each channel's


def _ramp(start: float, end: float | None, steps: int) -> torch.Tensor:
    """(steps,) float64: `start` at the first step to `end` at the last, linear in the step index
    (`end` None: `start` at every step)."""
    if end is None or steps < 2:
        return torch.full((steps,), float(start), dtype=torch.float64)
    return torch.linspace(float(start), float(end), steps, dtype=torch.float64)


class QDrift(Corrector):
    """Q-Drift: per-step drift rescaling from V_i (mode "paper" or "exact"), optional bias removal.

    Beyond the paper (`qdrift_plus`, README "Beyond the paper"): `mean_removal` subtracts that fraction of
    each step's mean error mu_e (per channel with channel pooling), the systematic part the drift rule
    leaves alone, without E[e | u]'s slope, which shrinks outputs toward the pooled mean. mu_e is first
    shrunk by its standard error over the calibration runs: removing an unresolved mean would add a
    bias of its own, which the trajectory accumulates. `infeasible` picks what the rule does at steps no
    sigma' can make exact (rules.INFEASIBLE; the paper rule's "feasible_only" is an ablation). There,
    "shrink" removes E[e | u]'s slope from the output, u - slope (u - mu_u): no drift can take the
    residual variance away at those steps, but the part of the output's spread that the error explains
    can be. That is D-D^2's correction, confined to those steps and channels, with its one slope and
    centre per step (the fit pooled over channels; E[e | u] fitted per channel hurt on bench_flow's tune
    pool, experiments/results/qdrift_plus_shrink_bench.md). `shrink_strength` scales that slope (1: E[e | u]'s);
    `shrink_centre` "channel" shrinks toward each channel's mean output instead of the pooled one.
    `mean_map_runs` > 0: the mean removed is the mean error map of that many runs, per channel and latent
    position (drift/error_map.py, given with `use_mean_map`), instead of mu_e per channel.
    `mean_map_spatial` false keeps only that map's channel means: a control for how much of its effect is
    the spatial pattern and how much the larger number of runs.
    `drift_scale_end` / `mean_removal_end`: the value at the last step, the first step's being `drift_scale`
    / `mean_removal`, linear in the step index in between (None: the same at every step). Early and late
    steps differ (the late ones carry most of the residual variance, the middle ones most of the mean).
    """

    def __init__(self, stats: DriftStatistics, layout: str = "image", mode: str = "paper",
                 drift_scale: float = 1.0, bias_removal: bool = False, mean_removal: float = 0.0,
                 infeasible: str | None = None, shrink_strength: float = 1.0, shrink_centre: str = "pooled",
                 mean_map_runs: int = 0, mean_map_spatial: bool = True, drift_scale_end: float | None = None,
                 mean_removal_end: float | None = None):
        super().__init__(stats, layout)
        for name, value, high in (("drift_scale", drift_scale, math.inf), ("drift_scale_end", drift_scale_end, math.inf),
                                  ("mean_removal", mean_removal, 1.0), ("mean_removal_end", mean_removal_end, 1.0)):
            if value is None and name.endswith("_end"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= high:
                what = "the fraction of the mean error removed, in [0, 1]" if high == 1 else "a finite number >= 0"
                raise ValueError(f"{name} is {what}, got {value!r}")
        if stats.num_steps < 2 and (drift_scale_end not in (None, drift_scale) or
                                    mean_removal_end not in (None, mean_removal)):
            raise ValueError("drift_scale_end / mean_removal_end set a schedule over the steps, and one step has "
                             "no end to reach: leave them unset")
        self.drift_scale = _ramp(drift_scale, drift_scale_end, stats.num_steps)          # (S,) per step
        self.mean_removal = _ramp(mean_removal, mean_removal_end, stats.num_steps)
        removes_mean = bool(self.mean_removal.any())
        if bias_removal and removes_mean:
            raise ValueError("bias_removal already removes the mean error (with E[e | u]'s slope): "
                             "set mean_removal=0 (and mean_removal_end unset or 0) with it")
        self.mode, self.bias_removal = mode, bool(bias_removal)
        self.infeasible = infeasible_choice(mode, infeasible)
        if bias_removal and self.infeasible == "shrink":
            raise ValueError("bias_removal already removes E[e | u]'s slope at every step: infeasible=shrink adds nothing")
        if isinstance(shrink_strength, bool) or not isinstance(shrink_strength, (int, float)) or \
                not math.isfinite(shrink_strength) or shrink_strength < 0 or \
                (shrink_strength != 1 and self.infeasible != "shrink"):
            raise ValueError(f"shrink_strength scales infeasible=shrink's slope (>= 0), got {shrink_strength} with "
                             f"infeasible={self.infeasible}")
        self.shrink_strength = float(shrink_strength)
        if shrink_centre not in SHRINK_CENTRES or (shrink_centre != "pooled" and self.infeasible != "shrink"):
            raise ValueError(f"shrink_centre is where infeasible=shrink shrinks toward, one of {list(SHRINK_CENTRES)}; "
                             f"got {shrink_centre!r} with infeasible={self.infeasible}")
        self.shrink_centre = shrink_centre
        if isinstance(mean_map_runs, bool) or not isinstance(mean_map_runs, int) or mean_map_runs < 0 or \
                mean_map_runs == 1 or (mean_map_runs and not removes_mean):
            raise ValueError(f"mean_map_runs: the runs of the mean error map that mean removal subtracts (0: per "
                             f"channel from the statistics, else >= 2, with mean_removal > 0), got {mean_map_runs!r}")
        self.mean_map_runs = mean_map_runs
        if not isinstance(mean_map_spatial, bool) or (not mean_map_spatial and not mean_map_runs):
            raise ValueError(f"mean_map_spatial=false keeps only the map's channel means (a control); it needs "
                             f"mean_map_runs > 0, got mean_map_spatial={mean_map_spatial!r}, mean_map_runs={mean_map_runs}")
        self.mean_map_spatial = mean_map_spatial
        self.mean_map: torch.Tensor | None = None   # (S, C, P), use_mean_map
        self.shrunk_mean = stats.shrunk_mean_error() if removes_mean else None
        self.shrink: torch.Tensor | None = None   # (S, C) slope where the output is shrunk, else 0; per schedule
        self._noisy = False                        # this step is DDIM's with eta > 0

    def use_mean_map(self, mean_map: torch.Tensor) -> "QDrift":
        """Mean removal subtracts this (S, C, P) map of the mean error (drift/error_map.py) instead of mu_e."""
        steps, channels = self.stats.num_steps, self.stats.s_ee.shape[1]
        if mean_map.ndim != 3 or mean_map.shape[0] != steps or (channels > 1 and mean_map.shape[1] != channels):
            raise StatisticsMismatch(f"a mean error map of shape {tuple(mean_map.shape)} does not fit {steps} steps "
                                     f"and {channels} channels")
        if not torch.isfinite(mean_map).all():
            raise ValueError("the mean error map has non-finite values")
        self.mean_map = mean_map
        return self

    def step(self, scheduler, i, model_output, sample, parent, step_kwargs):
        # DDIM with eta > 0 runs no drift rule (Corrector.step), so no infeasible-step choice either.
        self._noisy = float(step_kwargs.get("eta") or 0.0) > 0
        return super().step(scheduler, i, model_output, sample, parent, step_kwargs)

    def step_coefficients(self, schedule: Schedule) -> Coefficients:
        if self.infeasible == "shrink":   # where the rule itself applies (not on stochastic samplers)
            where = torch.zeros_like(self.stats.residual_var, dtype=torch.bool) if schedule.stochastic else \
                ~feasible_steps(schedule, self.stats.residual_var)
            self.shrink = where.to(torch.float64) * self.shrink_strength * self.stats.scalar().regression_slope
        return coefficients(schedule, self.stats.residual_var, self.mode, self.infeasible).scaled(
            self.drift_scale[:, None])

    def transform_output(self, i, u):
        if self.bias_removal:
            return (u.float() - self._conditional_bias(i, u)).to(u.dtype)
        shrinks = self.shrink is not None and not self._noisy and bool(self.shrink[i].any())
        removal = float(self.mean_removal[i])
        if not (removal or shrinks):
            return u
        u32 = out = u.float()
        if removal:
            out = out - removal * self._mean_error(i, u)
        if shrinks:
            centre = self.stats.mu_u if self.shrink_centre == "channel" else self.stats.scalar().mu_u
            out = out - self._vec(self.shrink, i, u) * (u32 - self._vec(centre, i, u))
        return out.to(u.dtype)

    def _mean_error(self, i: int, u: torch.Tensor) -> torch.Tensor:
        if not self.mean_map_runs:
            return self._vec(self.shrunk_mean, i, u)
        if self.mean_map is None:
            raise RuntimeError("mean_map_runs is set but no mean error map was given: call use_mean_map")
        if self.mean_map[i].numel() != u[0].numel():
            raise StatisticsMismatch(f"the mean error map has {self.mean_map[i].numel()} values per step, the latents "
                                     f"{u[0].numel()}: it was computed at another resolution")
        m = self.mean_map[i]
        if not self.mean_map_spatial:   # the channel means of the same runs alone (the map's residual averages to 0)
            m = m.mean(dim=-1, keepdim=True).expand_as(m)
        return to_latent(m, u, self.layout)

    def drift_factors(self) -> torch.Tensor:
        """c_i per step (and channel): the relative change of each step's update (for plots and logs)."""
        if self.coef is None:
            raise RuntimeError("call scheduler.set_timesteps first")
        return torch.where(self.coef.out != 1, self.coef.out - 1, self.coef.p - 1)


class PTQD(Corrector):
    """PTQD as its authors adapt it: e = k u_fp + b + r; correct with (u - b) / (1 + k).

    k: one slope per step of the error on the FP output, from the scalar statistics, clamped at k >= 0
    (the authors' code does); b: the mean of e - k u_fp in the statistics' pooling (per channel, as PTQD's
    bias correction, with `pooling: channel`). Stochastic samplers absorb Var(r) / (1 + k)^2.
    """

    def __init__(self, stats: DriftStatistics, layout: str = "image"):
        super().__init__(stats, layout)
        sc = stats.scalar()
        s_ff = sc.s_uu - 2 * sc.s_ue + sc.s_ee            # Var(u_fp), u_fp = u - e
        s_ef = sc.s_ue - sc.s_ee                          # Cov(e, u_fp)
        self.k = torch.where(s_ff > 0, s_ef / s_ff.clamp_min(1e-300), torch.zeros_like(s_ff)).clamp_min(0)
        st, k = stats, self.k
        self.b = st.mu_e - k * (st.mu_u - st.mu_e)
        resid = st.s_ee - 2 * k * (st.s_ue - st.s_ee) + k**2 * (st.s_uu - 2 * st.s_ue + st.s_ee)   # Var(e - k u_fp)
        self.residual = resid.clamp_min(0) / (1 + k) ** 2  # what is left after the linear correction

    def transform_output(self, i, u):
        k, b = self._vec(self.k, i, u), self._vec(self.b, i, u)
        return ((u.float() - b) / (1 + k)).to(u.dtype)

    def absorbed_variance(self):
        return self.residual


D2DPM_VARIANTS = ("deterministic", "stochastic")


class D2DPM(Corrector):
    """D^2-DPM on the joint Gaussian of (u, e) per step.

    deterministic (D-D^2): u - E[e | u]; stochastic samplers absorb V = Var(e | u) into their own noise.
    stochastic (S-D^2): u - e~ with e~ ~ N(E[e | u], V) drawn afresh at every step: given u, the corrected
    output is distributed as u_fp is, so nothing is absorbed (the authors' S-D^2 sampler leaves sigma_t).
    Each trajectory draws from its own generator, seeded by `seed` and that trajectory's initial latent:
    runs repeat exactly, whatever the batch a trajectory is sampled in.
    """

    def __init__(self, stats: DriftStatistics, layout: str = "image", variant: str = "deterministic",
                 seed: int = 0):
        super().__init__(stats, layout)
        if variant not in D2DPM_VARIANTS:
            raise ValueError(f"unknown D^2-DPM variant {variant!r}; choose one of {D2DPM_VARIANTS}")
        self.variant, self.seed = variant, int(seed)
        self.generators: list[torch.Generator] | None = None

    def prepare(self, scheduler):
        super().prepare(scheduler)
        self.generators = None   # seeded again at the first step of each trajectory

    def step(self, scheduler, i, model_output, sample, parent, step_kwargs):
        if self.variant == "stochastic" and (i == 0 or self.generators is None):
            self._seed(sample)
        return super().step(scheduler, i, model_output, sample, parent, step_kwargs)

    def _seed(self, latents: torch.Tensor) -> None:
        rows = latents.detach().float().cpu().contiguous().numpy()
        self.generators = [torch.Generator().manual_seed((self.seed * 0x9E3779B1 + zlib.crc32(r.tobytes())) % 2**64)
                           for r in rows]

    def transform_output(self, i, u):
        mean = self._conditional_bias(i, u)
        if self.variant == "deterministic":
            return (u.float() - mean).to(u.dtype)
        if self.generators is None:   # called outside a trajectory: seed from the output itself
            self._seed(u)
        z = torch.stack([torch.randn(u.shape[1:], generator=g, dtype=torch.float32) for g in self.generators])
        return (u.float() - mean - self._vec(self.stats.residual_var, i, u).sqrt() * z.to(u.device)).to(u.dtype)

    def absorbed_variance(self):
        return self.stats.residual_var if self.variant == "deterministic" else None


class CumComp(Corrector):
    """Timestep-aware cumulative error compensation, our reading of Liu et al. 2025 (arXiv 2508.12094).

    A systematic per-step error b_i (the mean of e at step i, per channel with `pooling: channel`) reaches
    the final sample through the sampler's closed-form propagation; compensating the accumulated error at
    every step is, to first order, removing b_i where it enters: u - b_i. Calibrated on the FP trajectory
    (teacher forcing), so the compensated trajectory carries no mean deviation to propagate. Targets the
    systematic part only: no slope, no variance handling (README, "Peer correctors").
    """

    def transform_output(self, i, u):
        return (u.float() - self._vec(self.stats.mu_e, i, u)).to(u.dtype)


CORRECTORS = {"qdrift": QDrift, "ptqd": PTQD, "d2dpm": D2DPM, "cumcomp": CumComp}
# Code version of each corrector's rules (rules.py included): bump when a change alters its images.
# ptqd 2: k from the scalar fit, clamped at 0; bias per the statistics' pooling (channel by default).
# d2dpm 2: the stochastic variant draws per trajectory (independent of the batch).
CORRECTOR_VERSIONS = {"qdrift": 1, "ptqd": 2, "d2dpm": 2, "cumcomp": 1}


def make_corrector(kind: str, stats: DriftStatistics, layout: str = "image", **options) -> Corrector:
    """A corrector by config name (`corrector.<variant>.kind`)."""
    if kind not in CORRECTORS:
        raise ValueError(f"unknown corrector {kind!r}; known: {sorted(CORRECTORS)}")
    return CORRECTORS[kind](stats, layout, **options)
