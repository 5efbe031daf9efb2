"""calibrate: K paired FP / quantized runs -> the Q-Drift statistics pool.

Runs are computed in fixed blocks of `calib.batch_size` (runs [0, b), [b, 2b), ...), each block a
cached artifact keyed by its own prompts and seeds. Run k is therefore the same bytes whether a
pool was built fresh for K = 50 or grown by a sweep K = 1, 2, 5, ...: a sweep over K reuses every
block it already has, and no number depends on what ran before.
"""
from __future__ import annotations

import logging

from qdrift.cache import Artifact, atomic_write_json, config_key
from qdrift.distributed import barrier, shard, world
from qdrift.drift import CALIBRATION_VERSION, CalibrationPool, calibrate_batch
from qdrift.progress import progress
from qdrift.quant import quant_enabled

from .context import batches
from .sampling import call_pipeline

log = logging.getLogger("qdrift")
POOL_FILE = "pool.safetensors"


def calib_plan(ctx) -> list[tuple[Artifact, list[str], list[int]]]:
    """The blocks that hold runs 0..K-1: (artifact, prompts, seeds) each."""
    c = ctx.cfg.calib
    bs = int(c.batch_size)
    blocks = batches(int(c.num_runs), bs)
    prompts = ctx.prompt_set.calib_prompts(len(blocks) * bs)
    plan = []
    for block in blocks:
        block_prompts, seeds = [prompts[i] for i in block], [int(c.seed) + i for i in block]
        art = Artifact(ctx.cache_dir, "calib", {
            **ctx.sampling_key(), "quant": ctx.quant_art.key if ctx.quant_art is not None else None,
            "prompts": block_prompts, "seeds": seeds, "trim_std": float(c.trim_std),
            "layout": ctx.family.latent_layout, "algorithm": CALIBRATION_VERSION,
        })
        plan.append((art, block_prompts, seeds))
    return plan


def stats_key(ctx, plan) -> str:
    """What the statistics of this run are: its blocks and K (the images of a corrector read it)."""
    return config_key([art.key for art, _, _ in plan], int(ctx.cfg.calib.num_runs))


def calibrate_stage(ctx) -> CalibrationPool:
    plan = calib_plan(ctx)
    mine = shard(plan)   # torchrun: block b on rank b mod N (all of them in one process)
    todo = [item for item in mine if not item[0].verify()]
    if todo:
        log.info("Q-Drift calibration: %d of %d blocks of %d runs to compute", len(todo), len(plan),
                 int(ctx.cfg.calib.batch_size))
    for art, prompts, seeds in progress(todo, desc="Q-Drift calibration", unit="block", disable=not todo):
        art.ensure(lambda staging, p=prompts, s=seeds: _calibrate_block(ctx, p, s, staging))
    barrier()            # every rank needs the whole pool (each corrector's images read it)
    parts = [CalibrationPool.load(art.file(POOL_FILE)) for art, _, _ in plan]
    pool = parts[0]
    for part in parts[1:]:
        pool = pool.extend(part)
    ctx.stats_key = stats_key(ctx, plan)
    if world().is_main:
        export_stats(ctx, pool)
    return pool


def _calibrate_block(ctx, prompts: list[str], seeds: list[int], staging) -> dict:
    cfg = ctx.cfg

    def run(scheduler, quantized: bool):
        with quant_enabled(ctx.denoiser, quantized):
            call_pipeline(ctx, prompts, seeds, scheduler, output_type="latent")

    acc, timesteps = calibrate_batch(run, ctx.base_scheduler, int(cfg.sampler.steps),
                                     ctx.family.latent_layout, float(cfg.calib.trim_std))
    pool = acc.pool({**ctx.settings(), "timesteps": timesteps.tolist(), "channels": acc.channel.shape[2],
                     "prompts": prompts, "seeds": seeds, "trim_std": float(cfg.calib.trim_std)})
    pool.save(staging / POOL_FILE)
    return {"num_runs": pool.num_runs}


def export_stats(ctx, pool: CalibrationPool) -> None:
    """stats/ in the run dir: the pool used and a readable summary of the fit (V_i per step)."""
    out = ctx.run_dir / "stats"
    pool.save(out / POOL_FILE)
    k = int(ctx.cfg.calib.num_runs)
    summary = {"num_runs": k, "pool_runs": pool.num_runs, "timesteps": pool.manifest.get("timesteps")}
    for pooling in ("scalar", "channel"):
        fit = pool.fit(k, pooling)
        summary[f"residual_var_{pooling}"] = fit.residual_var.tolist()
    atomic_write_json(out / "summary.json", summary)
