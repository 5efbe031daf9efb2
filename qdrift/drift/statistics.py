"""Q-Drift calibration statistics: per-run paired moments and the per-step Gaussian fit.

`CalibrationPool` keeps one moment record per calibration run (trajectory), step and channel,
so any subset of runs (K = 1, 5, 10, 50 out of a larger pool, nested subsamples for the paper's
Fig. 2) is refit exactly without running the models again. `DriftStatistics` is the fit the
correctors read: per step i, the 2-D Gaussian of (u, e) and the conditional residual variance
V_i = s_ee - s_ue^2 / s_uu.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from qdrift.cache import atomic_write_bytes, read_safetensors, safetensors_bytes

from . import moments

POOL_FORMAT = "qdrift-calibration-pool/1"

POOLINGS = ("scalar", "channel")
# Manifest keys that must agree between statistics and the run that uses them.
COMPAT_KEYS = ("model", "quant", "sampler", "steps", "guidance", "eta", "resolution", "channels", "layout",
               "prediction")


class StatisticsMismatch(ValueError):
    """Statistics computed for another model/sampler/setting than the one they are used with."""


class InvalidStatistics(ValueError):
    """Statistics with values no fit can use (non-finite, negative variances or counts)."""


@dataclass
class DriftStatistics:
    """Per-step fitted moments, each (S, C') with C' = 1 (scalar pooling) or latent channels."""

    mu_u: torch.Tensor
    mu_e: torch.Tensor
    s_uu: torch.Tensor
    s_ee: torch.Tensor
    s_ue: torch.Tensor
    pooling: str = "scalar"
    manifest: dict = field(default_factory=dict)
    pooled: "DriftStatistics | None" = field(default=None, repr=False)   # a channel fit's scalar fit (same runs)
    mu_e_se: torch.Tensor | None = field(default=None, repr=False)      # standard error of mu_e over the runs

    def shrunk_mean_error(self) -> torch.Tensor:
        """mu_e shrunk toward zero by its standard error over runs (positive-part James-Stein,
        mu_e * max(0, 1 - se^2 / mu_e^2)): a mean error the runs do not resolve is not removed, so
        removing it cannot add a bias of its own. Zero without a standard error (K = 1)."""
        if self.mu_e_se is None:
            return torch.zeros_like(self.mu_e)
        keep = (1 - self.mu_e_se**2 / (self.mu_e**2).clamp_min(1e-300)).clamp_min(0)
        return self.mu_e * keep

    @property
    def num_steps(self) -> int:
        return self.s_ee.shape[0]

    def scalar(self) -> "DriftStatistics":
        """The fit pooled over channels too (PTQD's correlation coefficient reads it next to channel biases)."""
        if self.s_ee.shape[1] == 1:
            return self
        if self.pooled is None:
            raise ValueError("channel statistics without their scalar fit: fit them with CalibrationPool.fit")
        return self.pooled

    @property
    def residual_var(self) -> torch.Tensor:
        """V_i = E[Var(e | u)] = s_ee - s_ue^2 / s_uu (>= 0)."""
        slope = torch.where(self.s_uu > 0, self.s_ue / self.s_uu.clamp_min(1e-300), torch.zeros_like(self.s_ue))
        return (self.s_ee - slope * self.s_ue).clamp_min(0)

    @property
    def regression_slope(self) -> torch.Tensor:
        """s_ue / s_uu: how the error moves with the quantized output (for E[e | u])."""
        return torch.where(self.s_uu > 0, self.s_ue / self.s_uu.clamp_min(1e-300), torch.zeros_like(self.s_ue))

    def check_compatible(self, expected: Mapping) -> None:
        """Raise StatisticsMismatch when `expected` (the run's settings) disagrees with the manifest."""
        check_manifest(self.manifest, expected)


def check_manifest(manifest: Mapping, expected: Mapping) -> None:
    diffs = [
        f"{k}: statistics have {manifest.get(k)!r}, run has {expected[k]!r}"
        for k in COMPAT_KEYS
        if k in expected and k in manifest and _norm(manifest[k]) != _norm(expected[k])
    ]
    if diffs:
        raise StatisticsMismatch("Q-Drift statistics do not match this run (" + "; ".join(diffs) + ")")


def _norm(v):
    return round(float(v), 6) if isinstance(v, float) else v


def _mean_error_se(records: torch.Tensor, pooling: str) -> torch.Tensor | None:
    """Standard error of the pooled mean error from the spread of the runs' own means: positions within a
    run are correlated, runs are independent. None for one run."""
    if records.shape[0] < 2:
        return None
    means = moments.covariance(records)["mu_e"]               # (K, S) or (K, S, C)
    se = (means.var(0) / records.shape[0]).sqrt()
    return se[:, None] if pooling == "scalar" else se


@dataclass
class CalibrationPool:
    """Moment records of N calibration runs: `scalar` (N, S, 6) and `channel` (N, S, C, 6)."""

    scalar: torch.Tensor
    channel: torch.Tensor
    manifest: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.scalar.ndim != 3 or self.channel.ndim != 4 or self.scalar.shape[:2] != self.channel.shape[:2]:
            raise ValueError(f"inconsistent pool shapes: scalar {tuple(self.scalar.shape)}, "
                             f"channel {tuple(self.channel.shape)}")
        for name, records in (("scalar", self.scalar), ("channel", self.channel)):
            problem = invalid_records(records)
            if problem:
                raise InvalidStatistics(f"calibration statistics ({name}) are unusable: {problem}")

    @property
    def num_runs(self) -> int:
        return self.scalar.shape[0]

    @property
    def num_steps(self) -> int:
        return self.scalar.shape[1]

    @property
    def num_channels(self) -> int:
        return self.channel.shape[2]

    def fit(self, runs: int | Sequence[int] | None = None, pooling: str = "scalar") -> DriftStatistics:
        """Fit the per-step Gaussian on the first `runs` runs (int), on the listed runs, or on all."""
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        index = self._run_index(runs)
        records = self.scalar[index] if pooling == "scalar" else self.channel[index]
        pooled = moments.reduce(records, 0)                    # (S, 6) or (S, C, 6)
        if pooling == "scalar":
            pooled = pooled[:, None, :]
        cov = moments.covariance(pooled)
        manifest = dict(self.manifest, num_runs=len(index), runs=index.tolist(), pooling=pooling)
        pooled = self.fit(index.tolist(), "scalar") if pooling == "channel" else None
        return DriftStatistics(cov["mu_u"], cov["mu_e"], cov["s_uu"], cov["s_ee"], cov["s_ue"], pooling, manifest,
                               pooled, _mean_error_se(records, pooling))

    def _run_index(self, runs) -> torch.Tensor:
        if runs is None:
            runs = self.num_runs
        if isinstance(runs, int):
            if runs < 1:
                raise ValueError(f"the number of calibration runs K must be >= 1, got {runs}")
            if runs > self.num_runs:
                raise ValueError(f"asked for K={runs} runs but the pool holds {self.num_runs}")
            return torch.arange(runs)
        index = torch.as_tensor(list(runs), dtype=torch.long)
        if index.numel() == 0 or index.min() < 0 or index.max() >= self.num_runs:
            raise ValueError(f"run indices must be within [0, {self.num_runs}), got {index.tolist()}")
        return index

    def extend(self, more: "CalibrationPool") -> "CalibrationPool":
        """This pool followed by the runs of `more` (same settings)."""
        check_manifest(self.manifest, {k: more.manifest[k] for k in COMPAT_KEYS if k in more.manifest})
        if more.channel.shape[1:] != self.channel.shape[1:]:
            raise StatisticsMismatch("cannot extend a pool with runs of another step or channel count")
        manifest = dict(self.manifest, num_runs=self.num_runs + more.num_runs,
                        prompts=self.manifest.get("prompts", []) + more.manifest.get("prompts", []))
        return CalibrationPool(torch.cat([self.scalar, more.scalar]), torch.cat([self.channel, more.channel]), manifest)

    def save(self, path: str | Path) -> None:
        """Atomically write safetensors (float64 records + JSON manifest in the header)."""
        manifest = dict(self.manifest, num_runs=self.num_runs)
        atomic_write_bytes(path, safetensors_bytes({"scalar": self.scalar, "channel": self.channel}, POOL_FORMAT,
                                                   manifest))

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationPool":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no calibration statistics at {path}")
        try:
            tensors, manifest = read_safetensors(path, POOL_FORMAT, {"scalar", "channel"})
        except ValueError as err:
            raise ValueError(f"calibration statistics: {err}") from None
        try:
            return cls(tensors["scalar"], tensors["channel"], manifest)
        except InvalidStatistics as err:
            raise InvalidStatistics(f"{path}: {err}") from None


def invalid_records(records: torch.Tensor) -> str | None:
    """Why moment records cannot be statistics (non-finite values, negative counts or sums of squares)."""
    if records.shape[-1] != moments.FIELDS:
        return f"records have {records.shape[-1]} fields, expected {moments.FIELDS}"
    if not bool(torch.isfinite(records).all()):
        return "non-finite values (did the model output NaN or inf?)"
    if bool((records[..., moments.N] < 0).any()):
        return "negative sample counts"
    if bool((records[..., [moments.M_UU, moments.M_EE]] < 0).any()):
        return "negative sums of squares"
    return None
