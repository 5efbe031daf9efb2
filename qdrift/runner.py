"""One qdrift run, top to bottom: build -> quantize -> calibrate -> generate -> evaluate -> log.

Each stage reads the previous stage's cached artifact, so a re-run skips finished work and a
killed run resumes (see qdrift/cache.py); the run directory gets metrics.json, images/<variant>/,
stats/ and the resolved config.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from .cache import atomic_write_json, plain
from .config import ConfigError, check_writable, resolve_device, validate
from .distributed import broadcast, main_first, world
from .models.cuda_graph import CudaGraphForward, use_cuda_graphs
from .prompts import prompt_set
from .quant import fake_quant_layers
from .signals import terminate_on_sigterm
from .stages.build import build
from .stages.calibrate import calibrate_stage
from .stages.context import RunContext
from .stages.evaluate import evaluate_stage
from .stages.generate import generate_stage
from .stages.quantize import quantize_stage
from .tracking.wandb_logger import WandbLogger

log = logging.getLogger("qdrift")
STATUS_FILE = "status.json"
NO_LOGGER = OmegaConf.create({"kind": "none", "mode": "disabled"})


@terminate_on_sigterm()   # Slurm's kill: the `finally` blocks below still run (W&B finished, locks freed)
def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run every stage; returns the content of metrics.json."""
    validate(cfg)                                   # bad input fails here, before any model loads
    run_dir = Path(run_dir)
    check_writable(cfg.cache_dir, run_dir)
    config = plain(cfg)
    if world().distributed:   # rank 0 decides whether the directory may be used; every rank hears why not
        refusal = broadcast(claim_problem(run_dir, config) if world().is_main else None)
        if refusal:
            raise ConfigError(refusal)
    if not world().is_main:                         # a torchrun rank after the first: its share, no results
        return _run(cfg, run_dir)
    with claim_run_dir(run_dir, config):
        return _run(cfg, run_dir)


def _run(cfg: DictConfig, run_dir: Path) -> dict | None:
    main = world().is_main
    prompts_source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, run_dir, resolve_device(cfg.device),
                     prompts_source.eval_prompts(int(cfg.eval.num_prompts)), prompts_source)
    ctx.batch_prompts = padded_prompts(ctx)
    config = plain(cfg)
    if main:
        atomic_write_json(run_dir / STATUS_FILE, {"status": "running"})
        atomic_write_json(run_dir / "config.json", config)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = WandbLogger(cfg.logger if main else NO_LOGGER, run_dir, config)
    failed = True
    try:
        with ctx.stage("build"):
            build(ctx)
        with ctx.stage("quantize"), main_first():   # rank 0 quantizes, the others load its cached state
            quant_report = quantize_stage(ctx)
        if cfg.get("cuda_graph", False):   # after quantization: its calibration hooks must see eager calls
            graph_denoiser(ctx.denoiser)
        pool = None
        if cfg.corrector:
            with ctx.stage("calibrate"):
                pool = calibrate_stage(ctx)
        with ctx.stage("generate"):
            dirs = generate_stage(ctx, pool)
        with ctx.stage("evaluate"):
            metrics = evaluate_stage(ctx, dirs)
        if not main:
            failed = False
            return None
        result = {"variants": metrics, "config": config, "timing": ctx.timings, "quant": quant_report,
                  "device": str(ctx.device), "num_prompts": len(ctx.prompts), **device_info(ctx.device)}
        atomic_write_json(run_dir / "metrics.json", result)
        tracker.log_results(metrics, ctx.timings, dirs, ctx.prompts, int(cfg.logger.get("log_images", 0)))
        if (run_dir / "stats" / "summary.json").is_file():
            tracker.log_steps(json.loads((run_dir / "stats" / "summary.json").read_text()))
        failed = False
        return result
    finally:
        tracker.finish(failed=failed)   # always, so one crash does not break a sweep's next run
        if main:                        # read by a sweep's progress log (qdrift/launch.py)
            atomic_write_json(run_dir / STATUS_FILE, {"status": "failed" if failed else "done", "seconds": round(
                sum(v for k, v in ctx.timings.items() if "/" not in k), 3)})   # the stages, not per-image rates


def claim_problem(run_dir: Path, config: dict) -> str | None:
    """Why `run_dir` may not hold this run, or None. A directory left by an unfinished run of the same
    config (a Slurm job requeued after preemption or its time limit) is taken back: its images are
    copies of cache entries this run's keys name again."""
    if (run_dir / "metrics.json").exists():
        return (f"run directory {run_dir} already holds a run's results; use a new one "
                "(hydra.run.dir=...) so nothing already produced is overwritten")
    if (run_dir / "images").exists() and not _unfinished_same_run(run_dir, config):
        return (f"run directory {run_dir} holds another run's images; use a new one (hydra.run.dir=...) so "
                "nothing already produced is overwritten")
    lock = FileLock(str(run_dir / ".qdrift-run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return f"run directory {run_dir} is in use by another run"
    lock.release()
    return None


def _unfinished_same_run(run_dir: Path, config: dict) -> bool:
    try:
        status = json.loads((run_dir / STATUS_FILE).read_text())["status"]
        return status != "done" and json.loads((run_dir / "config.json").read_text()) == config
    except (OSError, ValueError, KeyError, TypeError):
        return False


@contextmanager
def claim_run_dir(run_dir: Path, config: dict):
    """One run, one directory: refuse a directory that holds another run's results or is in use."""
    problem = claim_problem(run_dir, config)
    if problem:
        raise ConfigError(problem)
    lock = FileLock(str(run_dir / ".qdrift-run.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ConfigError(f"run directory {run_dir} is in use by another run") from None
    try:
        yield
    finally:
        lock.release()


def padded_prompts(ctx: RunContext) -> list[str]:
    """The evaluation prompts followed by the next ones of the set up to whole batches (the padding
    is generated, never evaluated); repeats the last prompt where the set has no more."""
    n, bs = len(ctx.prompts), int(ctx.cfg.batch_size)
    total = -(-n // bs) * bs
    try:
        more = ctx.prompt_set.eval_prompts(total)
    except ValueError:
        more = []
    if more[:n] == ctx.prompts and len(more) == total:
        return more
    return ctx.prompts + [ctx.prompts[-1]] * (total - n)


def graph_denoiser(denoiser) -> CudaGraphForward:
    """Route denoiser calls through CUDA graphs, one set per quantization state (FP / quantized)."""
    layers = [m for _, m in fake_quant_layers(denoiser)]
    return use_cuda_graphs(denoiser, state_key=lambda: tuple(m.quant_on for m in layers))


def device_info(device) -> dict:
    """The card and the peak GPU memory of this process (what a paper row needs per GPU)."""
    if device.type != "cuda":
        return {}
    return {"gpu": torch.cuda.get_device_name(device),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
