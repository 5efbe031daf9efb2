"""calibrate: K paired FP / quantized runs -> the Q-Drift statistics pool.

Runs are computed in fixed blocks of `calib.batch_size` (runs [0, b), [b, 2b), ...), each block a
cached artifact keyed by its own prompts and seeds. Run k is therefore the same bytes whether a
pool was built fresh for K = 50 or grown by a sweep K = 1, 2, 5, ...: a sweep over K reuses every
block it already has, and no number depends on what ran before.

A block also keeps its runs' raw error samples (`samples.safetensors`, drift/calibration.py
`ErrorSamples`: a few KB per run) for the report's Fig. 4 and Fig. 5. The run dir's stats/ gets
the pool, the samples and summary.json: V_i per step and each corrector's per-step drift factors.
"""
from __future__ import annotations

import logging

from qdrift.cache import Artifact, atomic_write_json, config_key
from qdrift.distributed import barrier, shard, world
from qdrift.drift import CALIBRATION_VERSION, CalibrationPool, calibrate_batch, wrap_scheduler
from qdrift.drift.calibration import replay_set_timesteps
from qdrift.drift.samples import ErrorSamples
from qdrift.progress import progress
from qdrift.quant import quant_enabled

from .context import batches
from .sampling import call_pipeline

log = logging.getLogger("qdrift")
POOL_FILE = "pool.safetensors"
SAMPLES_FILE = "samples.safetensors"


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
        export_stats(ctx, pool, load_samples([art for art, _, _ in plan]))
    return pool


def load_samples(arts: list[Artifact]) -> ErrorSamples | None:
    """The raw error samples of every block in order (run k of the pool is run k here), or None when
    a block has none (made by an older version)."""
    if not all(art.file(SAMPLES_FILE).is_file() for art in arts):
        return None
    samples = ErrorSamples.load(arts[0].file(SAMPLES_FILE))
    for art in arts[1:]:
        samples = samples.extend(ErrorSamples.load(art.file(SAMPLES_FILE)))
    return samples


def paired_runs(ctx, prompts: list[str], seeds: list[int]):
    """`run(scheduler, quantized)` for calibrate_batch: the batch's latents through the pipeline."""
    def run(scheduler, quantized: bool):
        with quant_enabled(ctx.denoiser, quantized):
            call_pipeline(ctx, prompts, seeds, scheduler, output_type="latent")
    return run


def _calibrate_block(ctx, prompts: list[str], seeds: list[int], staging) -> dict:
    cfg = ctx.cfg
    acc, timesteps = calibrate_batch(paired_runs(ctx, prompts, seeds), ctx.base_scheduler, int(cfg.sampler.steps),
                                     ctx.family.latent_layout, float(cfg.calib.trim_std))
    pool = acc.pool({**ctx.settings(), "timesteps": timesteps.tolist(), "channels": acc.channel.shape[2],
                     "prompts": prompts, "seeds": seeds, "trim_std": float(cfg.calib.trim_std),
                     "sampler_call": acc.sampler_call})
    pool.save(staging / POOL_FILE)
    acc.samples({"seeds": seeds, "layout": ctx.family.latent_layout}).save(staging / SAMPLES_FILE)
    return {"num_runs": pool.num_runs}


def export_stats(ctx, pool: CalibrationPool, samples: ErrorSamples | None = None) -> None:
    """stats/ in the run dir: the pool used, its runs' raw error samples and a readable summary of the
    fit (V_i per step, and the per-step drift factors of each corrector that has them)."""
    out = ctx.run_dir / "stats"
    pool.save(out / POOL_FILE)
    if samples is not None:
        samples.save(out / SAMPLES_FILE)
    k = int(ctx.cfg.calib.num_runs)
    summary = {"num_runs": k, "pool_runs": pool.num_runs, "timesteps": pool.manifest.get("timesteps")}
    for pooling in ("scalar", "channel"):
        fit = pool.fit(k, pooling)
        summary[f"residual_var_{pooling}"] = fit.residual_var.tolist()
    factors = corrector_drift_factors(ctx, pool)
    if factors:
        summary["drift_factors"] = factors
    atomic_write_json(out / "summary.json", summary)


def corrector_drift_factors(ctx, pool: CalibrationPool) -> dict[str, list]:
    """Per corrector variant with drift factors (Q-Drift's c_i: each step's relative change of the
    update), (steps, channels or 1) as nested lists; the others are left out. The sampler is set up by
    replaying the pipeline's own set_timesteps call that calibration recorded (FLUX's shifted sigmas
    included), so no model runs. A diagnostic: a failure is a warning, never the run's end (the
    generate stage builds the same correctors and says why)."""
    from .generate import corrector_for, variants

    specs = {name: spec for name, spec in variants(ctx).items() if spec is not None}
    call = pool.manifest.get("sampler_call")
    if not specs or call is None:
        return {}
    factors = {}
    for name, spec in specs.items():
        try:
            hook = corrector_for(ctx, name, spec, pool, with_map=False)   # drift factors do not need it
            if hasattr(hook, "drift_factors"):
                replay_set_timesteps(wrap_scheduler(ctx.base_scheduler, hook), call)   # prepares the hook
                factors[name] = hook.drift_factors().double().tolist()
        except Exception as err:  # noqa: BLE001 - a diagnostic must not take the run down
            log.warning("%s: per-step drift factors not exported: %s", name, " ".join(str(err).split()))
    return factors
