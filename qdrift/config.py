"""Validation of a composed run config: every bad input gets a one-line error before any model loads.

`check_config` reads the config alone (types, ranges, combinations that cannot do what they say);
`qdrift.inputs.check_inputs` looks for the files a run will read (weights, MJHQ, enough prompts);
`validate` does both. Hydra's callback (qdrift/launch.py) runs it before the run directory exists,
the runner again before it loads a model (tests and scripts call the runner directly).
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import inspect
import logging
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .distributed import world
from .drift.correctors import CORRECTORS, D2DPM_VARIANTS, SHRINK_CENTRES
from .drift.rules import INFEASIBLE, MODES, schedule_of
from .drift.statistics import POOLINGS
from .prompts import POOLS
from .models.families import FAMILIES
from .models.loaders import DTYPES, SOURCES
from .models.random_arch import ARCH_SIZES
from .samplers import SAMPLERS, STEP_OPTIONS, check_sampler, make_scheduler, sampler_eta, sampler_options

log = logging.getLogger("qdrift")

def path_safe(text, limit: int = 120) -> str:
    """A sweep job's folder name from its overrides (conf/config.yaml): a "/" would nest folders, and a long
    list of overrides (an Optuna trial's floats) would pass the file system's 255-byte limit."""
    text = str(text).replace("/", "_")
    return text if len(text) <= limit else f"{text[:limit - 11]}_{hashlib.sha1(text.encode()).hexdigest()[:10]}"


OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
# Run directories are named to the second; two runs started in the same second need another part.
# Fixed per process (and cached in the config, which travels to a launcher's jobs with it); the ranks
# of one torchrun job share rank 0's (set_run_id), so they name one directory.
_RUN_ID = {"time": datetime.datetime.now(), "suffix": os.urandom(3).hex()}
OmegaConf.register_new_resolver("run_time", lambda fmt: _RUN_ID["time"].strftime(fmt), replace=True, use_cache=True)
OmegaConf.register_new_resolver("run_suffix", lambda: _RUN_ID["suffix"], replace=True, use_cache=True)
# Ranks after the first of a torchrun job log to their own file, tag their lines and leave .hydra/ to rank 0.
OmegaConf.register_new_resolver("rank_file", lambda: "" if world().is_main else f"_rank{world().rank}", replace=True)
OmegaConf.register_new_resolver("rank_label", lambda: "" if world().is_main else f" rank{world().rank}", replace=True)
OmegaConf.register_new_resolver("rank_subdir", lambda d: d if world().is_main else None, replace=True)
# `replicate` sets the four seeds of a replicate (conf/config.yaml): seed `offset` of replicate r's seed block.
OmegaConf.register_new_resolver("replicate_seed", lambda r, offset=0: _replicate_seed(r, offset), replace=True)


@functools.lru_cache(maxsize=1)
def tuned_table() -> dict:
    path = Path(__file__).parent / "conf" / "tuned.yaml"
    table = OmegaConf.to_container(OmegaConf.load(path))
    for corrector, settings in table.items():
        if not isinstance(settings, dict) or not isinstance(settings.get("default"), dict):
            raise ConfigError(f"{path}: {corrector} needs a `default:` mapping of its tuned values")
    return table


def tuned_value(corrector: str, key: str, model=None, sampler=None, quant=None):
    """`corrector`'s tuned `key` for the setting model/sampler/quant, or its default where the setting is not
    listed or does not list that key."""
    table = tuned_table()
    if corrector not in table:
        raise ConfigError(f"no tuned values for corrector {corrector!r} in conf/tuned.yaml; it has {sorted(table)}")
    settings = table[corrector]
    values = {**settings["default"], **settings.get(f"{model}/{sampler}/{quant}", {})}   # a key not listed: default
    if key not in values:
        raise ConfigError(f"conf/tuned.yaml: {corrector} has no tuned {key!r} (has {sorted(values)})")
    return values[key]


# `tuned` reads a corrector's hyperparameters tuned for the run's setting (conf/tuned.yaml).
OmegaConf.register_new_resolver("tuned", tuned_value, replace=True)


def _replicate_seed(replicate, offset) -> int:
    from .stages.context import replicate_seed

    if not isinstance(replicate, int) or isinstance(replicate, bool) or replicate < 0:
        raise ValueError(f"replicate must be an integer >= 0, got {replicate!r}")
    return replicate_seed(replicate, offset)


def run_id() -> dict:
    return dict(_RUN_ID)


def set_run_id(ident: dict) -> None:
    _RUN_ID.update(ident)

PREDICTIONS = ("epsilon", "v_prediction", "flow")
PROMPT_SETS = ("builtin", "bench", "mjhq")
FEATURES = ("pixels", "clip", "inception")
CLIPS = ("none", "bench", "openclip")
REFERENCES = ("none", "rendered", "directory")
REFERENCE_OF = {"builtin": ("none",), "bench": ("none", "rendered"), "mjhq": ("none", "directory")}
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
EVAL_SEED_SPAN = 10_000_000   # evaluation seeds live in [seed, seed + span)
MAX_SEED = 2**63 - 1          # torch.Generator.manual_seed


# Pixels per latent patch: the VAE's downsampling times the denoiser's patch (or FLUX's 2x2 packing).
RESOLUTION_MULTIPLE = {"pixart": 16, "sd": 8, "sdxl": 8, "flux": 16, "sana": 32}


class ConfigError(ValueError):
    """A user-facing configuration error (printed as one line, exit code 2)."""


def one_line(text) -> str:
    return " ".join(str(text).split())


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


# --- typed fields: Hydra parses `seed=abc` as a string, `steps=1.5` as a float -------------------
def _int(value, name: str, low: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    bound = "" if low is None else f" >= {low}"
    _require(ok and (low is None or value >= low), f"{name} must be an integer{bound}, got {value!r}")
    return value


def _positive_int(value, name: str) -> int:
    return _int(value, name, 1)


def _number(value, name: str, low: float | None = None, high: float | None = None) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    bound = "" if low is None else f" >= {low:g}"
    bound = bound if high is None else f" in [{low:g}, {high:g}]"
    _require(ok and (low is None or value >= low) and (high is None or value <= high),
             f"{name} must be a number{bound}, got {value!r}")
    return float(value)


def _bool(value, name: str) -> bool:
    _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
    return value


def _choice(value, name: str, choices) -> str:
    _require(value in choices, f"{name}={value!r} is not an option; choose one of {list(choices)}")
    return value


def _text(value, name: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    _require(isinstance(value, str) and value != "", f"{name} must be a non-empty string, got {value!r}")
    return value


def _seed(value, name: str) -> int:
    _require(_int(value, name, 0) <= MAX_SEED, f"{name} must be < 2**63, got {value!r}")
    return value


def validate(cfg, inputs: bool = True) -> None:
    """Check everything that can be checked without loading a model (`inputs`: also the files it reads)."""
    try:
        check_config(cfg)
        if inputs:
            from .inputs import check_inputs

            check_inputs(cfg)
    except OmegaConfBaseException as err:   # a missing key or a broken ${...} interpolation
        raise ConfigError(f"config: {one_line(err)}") from None


def check_config(cfg) -> None:
    """Types, ranges and combinations, from the config alone."""
    replicate = _int(cfg.get("replicate", 0), "replicate", 0)   # before the seeds that interpolate it
    _require(_replicate_seed(replicate + 1, 0) <= MAX_SEED, f"replicate={replicate} is too large: its block of seeds "
                                                       "would pass 2**63")
    _seed(cfg.seed, "seed")
    _text(cfg.device, "device")
    _positive_int(cfg.batch_size, "batch_size")
    graphs = _bool(cfg.get("cuda_graph", False), "cuda_graph")
    _text(cfg.output_root, "output_root")
    _text(cfg.cache_dir, "cache_dir")
    _validate_model(cfg.model)
    _validate_objective(cfg)
    _validate_sampler(cfg)
    _validate_quant(cfg.quant)
    m, q = cfg.model, cfg.quant
    if m.source == "random" and m.get("arch_size") == "reduced" and q.method == "svdquant":
        # the reduced architectures' narrowest quantized layers are 32 wide; the paper's rank is 32
        _require(int(q.rank) < 32, f"model.arch_size=reduced has layers 32 wide, too narrow for SVDQuant rank "
                                   f"{q.rank}; add model.svdquant_rank=4")
    _validate_calib(cfg.calib)
    _validate_correctors(cfg.corrector, cfg.quant)
    _validate_schedules(cfg)
    _validate_sampling_with_correctors(cfg)
    _validate_eval(cfg)
    _validate_seeds(cfg)
    _validate_logger(cfg.logger)
    device = resolve_device(cfg.device)
    _require(not graphs or device.type == "cuda",
             f"cuda_graph=true replays the denoiser as CUDA graphs and needs a GPU (device resolves to {device})")


def _validate_model(m) -> None:
    _text(m.name, "model.name")
    _choice(m.family, "model.family", sorted(FAMILIES))
    _choice(m.source, "model.source", SOURCES)
    _choice(m.get("dtype", "float32"), "model.dtype", sorted(DTYPES))
    _choice(m.prediction, "model.prediction", PREDICTIONS)
    _positive_int(m.resolution, "model.resolution")
    multiple = RESOLUTION_MULTIPLE.get(m.family, 8)
    _require(m.resolution % multiple == 0, f"model.resolution={m.resolution}: {m.family} pipelines need a multiple "
                                           f"of {multiple} (VAE downsampling x patch size)")
    if m.get("max_sequence_length") is not None:
        _positive_int(m.max_sequence_length, "model.max_sequence_length")
    if m.source == "hub":
        _text(m.get("hub_id"), "model.hub_id")
        _text(m.get("revision", "main"), "model.revision")
        _text(m.get("local_path"), "model.local_path", optional=True)
        _text(m.get("variant"), "model.variant", optional=True)
        _bool(m.get("allow_download", False), "model.allow_download")
    if m.source == "random":   # whether model.arch names a shipped file is an input check (loaders.check_available)
        _text(m.get("arch"), "model.arch")
        _choice(m.get("arch_size", "full"), "model.arch_size", ARCH_SIZES)
        _seed(m.get("seed", 0), "model.seed")


def _validate_sampler(cfg) -> None:
    s = cfg.sampler
    name = _choice(s.name, "sampler.name", sorted(SAMPLERS))
    try:
        check_sampler(name, cfg.model.prediction)
    except ValueError as err:
        raise ConfigError(f"sampler: {err}") from None
    _positive_int(s.steps, "sampler.steps")
    _number(s.guidance, "sampler.guidance", 0)
    options = s.get("options") or {}
    _require(isinstance(options, Mapping), f"sampler.options must be a mapping, got {options!r}")
    if "eta" in options:
        _check_eta(cfg, name, options["eta"])
    steps_args = set(STEP_OPTIONS.get(name, ()))   # step arguments the pipeline call passes (DDIM's eta)
    accepted = set(inspect.signature(SAMPLERS[name].cls.__init__).parameters) - {"self"} | steps_args
    unknown = sorted(set(options) - accepted)
    _require(not unknown, f"sampler.options {unknown} are not settings of {SAMPLERS[name].cls.__name__} "
                          "(they would be ignored)")
    try:
        probe_scheduler(cfg)
    except (ValueError, TypeError, NotImplementedError, IndexError) as err:
        raise ConfigError(f"sampler={name} with sampler.options={dict(options)}: {one_line(err)}") from None


# Corrector kinds that handle DDIM's own noise (eta > 0): PTQD and D-D^2 shrink it by the residual variance
# (Corrector._ddim_noisy_step), S-D^2 and cumcomp correct the output and leave it alone (README, "Peer correctors").
ETA_CORRECTORS = "ptqd, d2dpm, d2dpm_stochastic and cumcomp"


def _check_eta(cfg, name: str, eta) -> None:
    """sampler.options.eta: DDIM's share of its own noise, a step argument the pipeline call passes."""
    _require(name == "ddim", f"sampler.options.eta={eta!r}: eta is DDIM's noise share (an argument of its "
                             f"steps); sampler={name} has none. Use sampler=ddim or remove sampler.options.eta")
    eta = _number(eta, "sampler.options.eta")
    _require(0 <= eta <= 1, f"sampler.options.eta={eta:g} is out of range: DDIM's eta is in [0, 1] "
                            "(0: deterministic DDIM, 1: DDPM-like noise)")
    if eta > 0:
        import diffusers

        family = FAMILIES[cfg.model.family]
        pipeline = getattr(diffusers, family.pipeline_class, None)
        _require(pipeline is None or "eta" in inspect.signature(pipeline.__call__).parameters,
                 f"sampler.options.eta={eta:g}: {family.pipeline_class} (model.family={family.name}) takes no eta, "
                 "so DDIM would run deterministic; use eta=0 or a model whose pipeline passes eta (sd, sdxl, pixart)")


def probe_scheduler(cfg):
    """The run's scheduler class and options on a default noise schedule, timesteps set for the run's step
    count (no model needed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    name, prediction = cfg.sampler.name, cfg.model.prediction
    options = sampler_options(cfg.sampler)[0]   # step arguments (DDIM's eta) are no scheduler config
    base = FlowMatchEulerDiscreteScheduler() if prediction == "flow" else SAMPLERS[name].cls()
    sch = make_scheduler(name, base, prediction, options)
    kwargs = {}
    if getattr(sch.config, "use_dynamic_shifting", False) and "mu" in inspect.signature(sch.set_timesteps).parameters:
        kwargs["mu"] = 0.0   # the pipeline passes its resolution shift; any value exercises the same code
    steps = int(cfg.sampler.steps)
    train_steps = getattr(sch.config, "num_train_timesteps", None)
    if train_steps is not None and steps > train_steps:
        raise ValueError(f"{steps} sampling steps exceed the schedule's num_train_timesteps={train_steps}")
    sch.set_timesteps(steps, **kwargs)
    return sch


def _validate_quant(q) -> None:
    from .quant import QuantSpec, is_implemented

    _seed(q.get("seed", 0), "quant.seed")   # PTQ calibration's prompts and noise (stages/quantize.py)
    try:
        spec = QuantSpec.from_config(q)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"quant={q.get('name')}: {one_line(err)}") from None
    _require(is_implemented(spec), f"quant={q.name}: method {q.method!r} is not implemented yet")


def quant_calib_prompts(q) -> int:
    """Calibration prompts the quantizer runs (0 without quantization)."""
    from .quant import QuantSpec

    spec = QuantSpec.from_config(q)
    if spec.method == "none":
        return 0
    return max(spec.calib_prompts, spec.mixdq.sensitivity_prompts if spec.mixdq else 0)


def calib_runs(cfg) -> int:
    """Q-Drift calibration runs computed for K: whole batches of calib.batch_size (stages/calibrate.py)."""
    bs = int(cfg.calib.batch_size)
    return -(-int(cfg.calib.num_runs) // bs) * bs


def map_runs(cfg) -> int:
    """Calibration runs the largest mean error map of the run's correctors uses (stages/error_map.py), or 0."""
    return max([int(c.get("mean_map_runs", 0) or 0) for c in (cfg.corrector or {}).values()] or [0])


def _validate_calib(c) -> None:
    _positive_int(c.num_runs, "calib.num_runs (K)")
    _seed(c.seed, "calib.seed")
    _number(c.trim_std, "calib.trim_std")
    _positive_int(c.batch_size, "calib.batch_size")


def _removes_mean(c) -> bool:
    """A Q-Drift variant removes some of the mean error at some step (mean_removal, or its end value)."""
    return bool(c.get("mean_removal", 0.0) or c.get("mean_removal_end") or 0)


def _validate_schedules(cfg) -> None:
    """A schedule over the steps (drift_scale_end, mean_removal_end) needs two steps to run between."""
    steps = cfg.sampler.get("steps")
    if not isinstance(steps, int) or steps >= 2:
        return
    for name, c in (cfg.corrector or {}).items():
        for key in ("drift_scale", "mean_removal"):
            end = c.get(f"{key}_end")
            _require(end is None or end == c.get(key, 1.0 if key == "drift_scale" else 0.0),
                     f"corrector.{name}.{key}_end sets a schedule over the steps, and sampler.steps={steps} has no "
                     "end to reach: leave it unset")


def _validate_correctors(correctors, quant) -> None:
    _require(correctors is None or isinstance(correctors, Mapping),
             f"corrector must be a mapping of variant name -> settings, got {correctors!r}")
    for name, c in (correctors or {}).items():
        _require(name not in ("fp", "quant"), f"corrector name {name!r} is reserved for a variant")
        _require(isinstance(c, Mapping), f"corrector.{name} must be a mapping with a kind, got {c!r}")
        _choice(c.get("kind"), f"corrector.{name}.kind", sorted(CORRECTORS))
        _choice(c.get("pooling", "scalar"), f"corrector.{name}.pooling", POOLINGS)
        allowed = {"kind", "pooling"} | set(inspect.signature(CORRECTORS[c.kind].__init__).parameters) - {
            "self", "stats", "layout"}
        unknown = sorted(set(c) - allowed)
        _require(not unknown, f"corrector.{name}: {unknown} are not settings of a {c.kind} corrector")
        if c.kind == "qdrift":
            _choice(c.get("mode", "paper"), f"corrector.{name}.mode", MODES)
            _number(c.get("drift_scale", 1.0), f"corrector.{name}.drift_scale", 0)
            _bool(c.get("bias_removal", False), f"corrector.{name}.bias_removal")
            _number(c.get("mean_removal", 0.0), f"corrector.{name}.mean_removal", 0, 1)
            if c.get("drift_scale_end") is not None:
                _number(c.drift_scale_end, f"corrector.{name}.drift_scale_end", 0)
            if c.get("mean_removal_end") is not None:
                _number(c.mean_removal_end, f"corrector.{name}.mean_removal_end", 0, 1)
            mode = c.get("mode", "paper")
            _require(c.get("infeasible") in (None, *INFEASIBLE[mode]),
                     f"corrector.{name}.infeasible={c.get('infeasible')!r} is not a choice of the {mode} rule "
                     f"(corrector.{name}.mode); choose one of {list(INFEASIBLE[mode])}")
            _require(not (c.get("bias_removal", False) and _removes_mean(c)),
                     f"corrector.{name}: bias_removal already removes the mean error; set mean_removal=0 (and "
                     f"mean_removal_end unset or 0) with it")
            _require(not (c.get("bias_removal", False) and c.get("infeasible") == "shrink"),
                     f"corrector.{name}: bias_removal already removes E[e | u]'s slope at every step; "
                     "infeasible=shrink adds nothing")
            _number(c.get("shrink_strength", 1.0), f"corrector.{name}.shrink_strength", 0)
            _choice(c.get("shrink_centre", "pooled"), f"corrector.{name}.shrink_centre", SHRINK_CENTRES)
            _require(c.get("shrink_centre", "pooled") == "pooled" or c.get("infeasible") == "shrink",
                     f"corrector.{name}.shrink_centre is where infeasible=shrink shrinks toward; set "
                     f"corrector.{name}.infeasible=shrink with it")
            from .prompts import TUNE_EXCLUDE

            runs = _int(c.get("mean_map_runs", 0), f"corrector.{name}.mean_map_runs", 0)
            _require(runs != 1, f"corrector.{name}.mean_map_runs=1: the map's standard error needs at least 2 runs")
            _require(runs <= TUNE_EXCLUDE, f"corrector.{name}.mean_map_runs={runs}: the map's calibration prompts "
                                           f"must stay out of the tune pool, which skips the first {TUNE_EXCLUDE}")
            _require(not runs or _removes_mean(c), f"corrector.{name}.mean_map_runs is the map mean removal "
                                                   f"subtracts; set corrector.{name}.mean_removal > 0")
            _bool(c.get("mean_map_spatial", True), f"corrector.{name}.mean_map_spatial")
            _require(c.get("mean_map_spatial", True) or runs, f"corrector.{name}.mean_map_spatial=false keeps only the "
                                                              f"map's channel means; set corrector.{name}.mean_map_runs")
            _require(not runs or quant.get("method", "none") != "none",
                     f"corrector.{name}.mean_map_runs: the map is the mean quantization error, and quant=none has none")
            _require(c.get("shrink_strength", 1.0) == 1 or c.get("infeasible") == "shrink",
                     f"corrector.{name}.shrink_strength scales infeasible=shrink's slope; set "
                     f"corrector.{name}.infeasible=shrink with it")
        if c.kind == "d2dpm":
            _choice(c.get("variant", "deterministic"), f"corrector.{name}.variant", D2DPM_VARIANTS)
            _seed(c.get("seed", 0), f"corrector.{name}.seed")


def _validate_sampling_with_correctors(cfg) -> None:
    """Correctors need a rule for the sampler (drift/rules.py); refuse variants that would change nothing."""
    if not cfg.corrector:
        return
    where = f"sampler={cfg.sampler.name} on a {cfg.model.prediction}-prediction model"
    try:
        schedule = schedule_of(probe_scheduler(cfg))
    except NotImplementedError as err:
        raise ConfigError(f"the correctors cannot run with {where}: {one_line(err)}; use a sampler with a "
                          "Q-Drift rule for it (e.g. sampler=dpmpp or ddim) or corrector=none") from None
    eta = sampler_eta(cfg.sampler)
    if eta > 0:
        _check_correctors_with_eta(cfg, eta)
        return
    if not schedule.stochastic:
        return
    for name, c in cfg.corrector.items():
        if c.kind != "qdrift":
            continue   # PTQD and D2DPM correct the model output, which acts on any sampler
        if not (c.get("bias_removal", False) or _removes_mean(c)):
            raise ConfigError(
                f"corrector.{name}: Q-Drift's drift correction is off on stochastic samplers ({where}, "
                f"sampler.options={dict(cfg.sampler.options or {})}), so this variant would equal the quantized "
                f"one; use a deterministic sampler, or set corrector.{name}.bias_removal=true, or use ptqd/d2dpm")
        log.warning("corrector.%s: %s is stochastic, so only Q-Drift's bias or mean removal acts (no drift correction)",
                    name, where)


def _check_correctors_with_eta(cfg, eta: float) -> None:
    """DDIM with eta > 0: Q-Drift's rules do not cover DDIM's own noise (its variants would equal the
    quantized one, bias removal aside); the peer correctors handle it."""
    inert = [name for name, c in cfg.corrector.items()
             if c.kind == "qdrift" and not (c.get("bias_removal", False) or _removes_mean(c))]
    if inert:
        raise ConfigError(
            f"{', '.join(f'corrector.{n}' for n in inert)}: Q-Drift has no drift rule for DDIM's own noise "
            f"(sampler.options.eta={eta:g} > 0), so {'this variant' if len(inert) == 1 else 'these variants'} "
            f"would equal the quantized one. The correctors that handle DDIM with eta > 0 are {ETA_CORRECTORS}: "
            "pick those, e.g. corrector=[ptqd,d2dpm] (corrector=all includes Q-Drift), or use eta=0")
    for name, c in cfg.corrector.items():
        if c.kind == "qdrift":
            log.warning("corrector.%s: DDIM with eta=%g adds its own noise, so only Q-Drift's bias or mean removal acts "
                        "(no drift correction)", name, eta)


def _validate_objective(cfg) -> None:
    """`objective`: the corrector variant whose FID delta a tuning run returns (Hydra's Optuna sweeper)."""
    name = cfg.get("objective")
    if name is None:
        return
    variants = sorted(cfg.corrector or {})
    _require(isinstance(name, str) and name in variants,
             f"objective={name!r} must name one of this run's corrector variants {variants}")
    _require(cfg.eval.get("pool", "eval") == "tune",
             f"objective={name} tunes on the run's prompts, so it needs eval.pool=tune: hyperparameters are never "
             "tuned on evaluation prompts")


def _validate_eval(cfg) -> None:
    e = cfg.eval
    prompts = _choice(e.prompt_set, "eval.prompt_set", PROMPT_SETS)
    n = _int(e.num_prompts, "eval.num_prompts", 2)   # FID and KID need at least two images
    _require(n < EVAL_SEED_SPAN, f"eval.num_prompts must be < {EVAL_SEED_SPAN}")
    _int(e.get("split", 0), "eval.split", 0)   # whether the set has that many prompts: inputs.check_inputs
    pool = _choice(e.get("pool", "eval"), "eval.pool", POOLS)
    _require(pool == "eval" or prompts == "bench", f"eval.pool={pool} needs eval.prompt_set=bench (the {prompts} "
                                                   "set has no tune pool)")
    _choice(e.features, "eval.features", FEATURES)
    _choice(e.clip, "eval.clip", CLIPS)
    _choice(e.reference, "eval.reference", REFERENCES)
    _require(e.reference in REFERENCE_OF[prompts],
             f"eval.reference={e.reference} does not exist for eval.prompt_set={prompts}; "
             f"choose one of {list(REFERENCE_OF[prompts])}")
    _positive_int(e.num_resamples, "eval.num_resamples")
    _int(e.kid_subset_size, "eval.kid_subset_size", 2)
    for key in ("mjhq_dir", "inception_weights", "clip_weights", "lpips_weights", "clip_pretrained"):
        _text(e.get(key), f"eval.{key}", optional=True)
    if e.clip == "openclip":
        _text(e.get("clip_arch"), "eval.clip_arch")


def _validate_seeds(cfg) -> None:
    """FP, quantized and corrected runs share noise; no calibration may reuse an evaluation seed."""
    bs = int(cfg.batch_size)
    n = -(-int(cfg.eval.num_prompts) // bs) * bs   # images are made in whole batches (stages/generate.py)
    ranges = {"evaluation": (cfg.seed, cfg.seed + n)}
    if cfg.corrector:
        ranges["calibration"] = (cfg.calib.seed, cfg.calib.seed + max(calib_runs(cfg), map_runs(cfg)))
    ptq = quant_calib_prompts(cfg.quant)
    if ptq:
        from .stages.context import ptq_seed_start

        lo = ptq_seed_start(cfg.quant.seed)
        ranges["PTQ calibration"] = (lo, lo + ptq)
    items = list(ranges.items())
    for i, (a, (a_lo, a_hi)) in enumerate(items):
        _require(a_hi <= MAX_SEED, f"{a} seeds reach past 2**63: lower seed, calib.seed, quant.seed or replicate")
        for b, (b_lo, b_hi) in items[i + 1:]:
            _require(a_hi <= b_lo or b_hi <= a_lo,
                     f"{b} seeds [{b_lo}, {b_hi}) overlap {a} seeds [{a_lo}, {a_hi}): change calib.seed, "
                     "quant.seed or seed (or set only replicate, which keeps them apart)")


def _validate_logger(lg) -> None:
    _choice(lg.kind, "logger.kind", LOGGERS)
    if lg.kind == "wandb":
        _choice(lg.mode, "logger.mode", WANDB_MODES)
        _text(lg.project, "logger.project")
        _int(lg.get("log_images", 0), "logger.log_images", 0)
        _number(lg.get("init_timeout", 10), "logger.init_timeout", 0.1)


def resolve_device(name: str) -> torch.device:
    """`auto`: a GPU if there is one. `auto` and `cuda` pick the GPU too: rank r of a torchrun job
    takes its LOCAL_RANK's GPU, job j of a local sweep GPU j mod (number of GPUs)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} asked for a GPU but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        w = world()
        slot = w.local_rank if w.distributed else _sweep_job_num()
        device = torch.device("cuda", slot % torch.cuda.device_count())
    elif device.type == "cuda" and world().distributed:
        raise ConfigError(f"device={name} under torchrun would put every rank on one GPU; use device=auto or "
                          "cuda (rank r then uses GPU LOCAL_RANK)")
    return device


def _sweep_job_num() -> int:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return 0
    try:
        return int(HydraConfig.get().job.get("num") or 0)
    except (TypeError, ValueError):
        return 0


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
            raise ConfigError(f"output directory {path} is not writable ({err.strerror or err}); "
                              "set output_root (or cache_dir) to a writable place") from None
        if not os.access(path, os.W_OK):
            raise ConfigError(f"output directory {path} is not writable; set output_root (or cache_dir) "
                              "to a writable place")
