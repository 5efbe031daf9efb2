"""calibrate: K paired FP / quantized runs -> the Q-Drift statistics pool (cached, extended on demand)."""
from __future__ import annotations

import logging
import shutil

from tqdm.auto import tqdm

from qdrift.cache import Artifact, atomic_write_json, text_hash
from qdrift.drift import CalibrationPool, calibrate_batch
from qdrift.quant import quant_enabled

from .sampling import call_pipeline

log = logging.getLogger("qdrift")


def pool_artifact(ctx) -> Artifact:
    """The pool depends on everything that shapes a trajectory, but not on K: a sweep over K shares it."""
    c = ctx.cfg.calib
    return Artifact(ctx.cache_dir, "calib", {
        **ctx.sampling_key(), "quant": ctx.quant_key(), "prompt_set": ctx.cfg.eval.prompt_set,
        "seed": int(c.seed), "trim_std": float(c.trim_std),
    })


def calibrate_stage(ctx) -> CalibrationPool:
    cfg = ctx.cfg
    k_runs, bs = int(cfg.calib.num_runs), int(cfg.calib.batch_size)
    art = pool_artifact(ctx)
    path = art.path / "pool.safetensors"
    pool = CalibrationPool.load(path) if path.is_file() else None
    have = pool.num_runs if pool is not None else 0
    if have < k_runs:
        prompts = ctx.prompt_set.calib_prompts(k_runs)
        log.info("calibrating runs %d..%d of the pool", have, k_runs - 1)
        for start in tqdm(range(have, k_runs, bs), desc="Q-Drift calibration", leave=False):
            idx = list(range(start, min(start + bs, k_runs)))
            batch_prompts = [prompts[i] for i in idx]
            seeds = [int(cfg.calib.seed) + i for i in idx]

            def run(scheduler, quantized: bool):
                with quant_enabled(ctx.denoiser, quantized):
                    call_pipeline(ctx, batch_prompts, seeds, scheduler, output_type="latent")

            acc, timesteps = calibrate_batch(run, ctx.base_scheduler, int(cfg.sampler.steps),
                                             ctx.family.latent_layout, float(cfg.calib.trim_std))
            part = acc.pool({**ctx.settings(), "timesteps": timesteps.tolist(), "channels": acc.channel.shape[2],
                             "prompts": batch_prompts, "seeds": seeds, "trim_std": float(cfg.calib.trim_std)})
            pool = part if pool is None else pool.extend(part)
            pool.save(path)  # after every batch: a crash loses at most one batch
        art.finish(num_runs=pool.num_runs, prompts_hash=text_hash(pool.manifest.get("prompts", [])))
    export_stats(ctx, pool, path)
    return pool


def export_stats(ctx, pool: CalibrationPool, path) -> None:
    """stats/ in the run dir: the pool used and a readable summary of the fit (V_i per step)."""
    out = ctx.run_dir / "stats"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(path, out / "pool.safetensors")
    k = int(ctx.cfg.calib.num_runs)
    summary = {"num_runs": k, "pool_runs": pool.num_runs, "timesteps": pool.manifest.get("timesteps")}
    for pooling in ("scalar", "channel"):
        fit = pool.fit(k, pooling)
        summary[f"residual_var_{pooling}"] = fit.residual_var.tolist()
    atomic_write_json(out / "summary.json", summary)
