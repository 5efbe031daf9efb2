"""One qdrift run, top to bottom: build -> quantize -> calibrate -> generate -> evaluate -> log.

Each stage reads the previous stage's cached artifact, so a re-run skips finished work and a
killed run resumes (see qdrift/cache.py); the run directory gets metrics.json, images/<variant>/,
stats/ and the resolved config.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .cache import atomic_write_json, plain
from .config import check_writable, resolve_device, validate
from .models.cuda_graph import CudaGraphForward, use_cuda_graphs
from .prompts import prompt_set
from .quant import fake_quant_layers
from .stages.build import build
from .stages.calibrate import calibrate_stage
from .stages.context import RunContext
from .stages.evaluate import evaluate_stage
from .stages.generate import generate_stage
from .stages.quantize import quantize_stage
from .tracking.wandb_logger import WandbLogger

log = logging.getLogger("qdrift")


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run every stage; returns the content of metrics.json."""
    validate(cfg)                                   # bad input fails here, before any model loads
    run_dir = Path(run_dir)
    check_writable(run_dir, cfg.cache_dir)
    prompts_source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, run_dir, resolve_device(cfg.device),
                     prompts_source.eval_prompts(int(cfg.eval.num_prompts)), prompts_source)
    config = plain(cfg)
    atomic_write_json(run_dir / "config.json", config)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    tracker = WandbLogger(cfg.logger, run_dir, config, name=run_dir.name)
    failed = True
    try:
        with ctx.stage("build"):
            build(ctx)
        with ctx.stage("quantize"):
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
        result = {"variants": metrics, "config": config, "timing": ctx.timings, "quant": quant_report,
                  "device": str(ctx.device), "num_prompts": len(ctx.prompts)}
        atomic_write_json(run_dir / "metrics.json", result)
        tracker.log_results(metrics, ctx.timings, dirs, ctx.prompts, int(cfg.logger.get("log_images", 0)))
        failed = False
        return result
    finally:
        tracker.finish(failed=failed)   # always, so one crash does not break a sweep's next run


def graph_denoiser(denoiser) -> CudaGraphForward:
    """Route denoiser calls through CUDA graphs, one set per quantization state (FP / quantized)."""
    layers = [m for _, m in fake_quant_layers(denoiser)]
    return use_cuda_graphs(denoiser, state_key=lambda: tuple(m.quant_on for m in layers))
