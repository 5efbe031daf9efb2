"""Validation of a composed run config: every bad input gets a one-line error before any model loads."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .drift.correctors import CORRECTORS
from .drift.rules import MODES
from .drift.statistics import POOLINGS
from .models.families import FAMILIES
from .models.loaders import DTYPES, SOURCES
from .samplers import check_sampler

# For Hydra's sweep subdir (conf/config.yaml): an override value with "/" would nest folders.
OmegaConf.register_new_resolver("path_safe", lambda s: str(s).replace("/", "_"), replace=True)

FEATURES = ("pixels", "clip", "inception")
CLIPS = ("none", "bench", "openclip")
REFERENCES = ("none", "rendered", "directory")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
EVAL_SEED_SPAN = 10_000_000   # evaluation seeds live in [seed, seed + span)


class ConfigError(ValueError):
    """A user-facing configuration error (printed as one line, exit code 2)."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _positive_int(value, name: str) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
             f"{name} must be an integer >= 1, got {value!r}")
    return value


def validate(cfg) -> None:
    """Check everything that can be checked without loading a model."""
    m = cfg.model
    _require(m.family in FAMILIES, f"model.family={m.family!r} is unknown; choose one of {sorted(FAMILIES)}")
    _require(m.source in SOURCES, f"model.source={m.source!r} is unknown; choose one of {list(SOURCES)}")
    _require(m.get("dtype", "float32") in DTYPES, f"model.dtype={m.get('dtype')!r}; choose one of {sorted(DTYPES)}")
    _require(m.prediction in ("epsilon", "v_prediction", "flow"),
             f"model.prediction={m.prediction!r}; choose epsilon, v_prediction or flow")
    try:
        check_sampler(cfg.sampler.name, m.prediction)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from None
    _positive_int(cfg.sampler.steps, "sampler.steps")
    _require(isinstance(cfg.sampler.guidance, (int, float)) and cfg.sampler.guidance >= 0,
             f"sampler.guidance must be >= 0, got {cfg.sampler.guidance!r}")
    _positive_int(m.resolution, "model.resolution")
    _positive_int(cfg.batch_size, "batch_size")
    _positive_int(cfg.calib.num_runs, "calib.num_runs (K)")
    _positive_int(cfg.calib.batch_size, "calib.batch_size")
    _validate_quant(cfg.quant)
    _validate_correctors(cfg.corrector)
    _validate_eval(cfg)
    _validate_logger(cfg.logger)
    device = resolve_device(cfg.device)
    graphs = cfg.get("cuda_graph", False)
    _require(isinstance(graphs, bool), f"cuda_graph must be true or false, got {graphs!r}")
    _require(not graphs or device.type == "cuda",
             f"cuda_graph=true replays the denoiser as CUDA graphs and needs a GPU (device resolves to {device})")


def _validate_quant(q) -> None:
    from .quant import QuantSpec, is_implemented

    try:
        spec = QuantSpec.from_config(q)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"quant={q.get('name')}: {err}") from None
    _require(is_implemented(spec), f"quant={q.name}: method {q.method!r} is not implemented yet")


def _validate_correctors(correctors) -> None:
    for name, c in (correctors or {}).items():
        _require(name not in ("fp", "quant"), f"corrector name {name!r} is reserved for a variant")
        _require(c.get("kind") in CORRECTORS, f"corrector.{name}.kind={c.get('kind')!r}; choose one of {sorted(CORRECTORS)}")
        _require(c.get("pooling", "scalar") in POOLINGS,
                 f"corrector.{name}.pooling={c.get('pooling')!r}; choose one of {list(POOLINGS)}")
        if c.kind == "qdrift":
            _require(c.get("mode", "paper") in MODES, f"corrector.{name}.mode={c.get('mode')!r}; choose one of {list(MODES)}")
            _require(float(c.get("drift_scale", 1.0)) >= 0, f"corrector.{name}.drift_scale must be >= 0")


def _validate_eval(cfg) -> None:
    e = cfg.eval
    n = _positive_int(e.num_prompts, "eval.num_prompts")
    _require(e.features in FEATURES, f"eval.features={e.features!r}; choose one of {list(FEATURES)}")
    _require(e.clip in CLIPS, f"eval.clip={e.clip!r}; choose one of {list(CLIPS)}")
    _require(e.reference in REFERENCES, f"eval.reference={e.reference!r}; choose one of {list(REFERENCES)}")
    _require(n < EVAL_SEED_SPAN, f"eval.num_prompts must be < {EVAL_SEED_SPAN}")
    # FP, quantized and corrected runs share noise; calibration must not reuse any evaluation seed.
    lo, hi = cfg.seed, cfg.seed + n
    c_lo, c_hi = cfg.calib.seed, cfg.calib.seed + max(cfg.calib.num_runs, 1)
    _require(c_hi <= lo or c_lo >= hi,
             f"calibration seeds [{c_lo}, {c_hi}) overlap evaluation seeds [{lo}, {hi}): change calib.seed or seed")


def _validate_logger(lg) -> None:
    _require(lg.kind in LOGGERS, f"logger.kind={lg.kind!r}; choose one of {list(LOGGERS)}")
    if lg.kind == "wandb":
        _require(lg.mode in WANDB_MODES, f"logger.mode={lg.mode!r}; choose one of {list(WANDB_MODES)}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} asked for a GPU but CUDA is not available on this machine")
    return device


def check_writable(*dirs: str | Path) -> None:
    """Create `dirs` and prove we can write there (a run must not fail after hours of sampling)."""
    for d in dirs:
        path = Path(d)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"output directory {path} is not writable ({err.strerror or err})") from None
        if not os.access(path, os.W_OK):
            raise ConfigError(f"output directory {path} is not writable")
