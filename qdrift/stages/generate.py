"""generate: the evaluation prompts once per variant (FP, quantized, each corrector), same seeds.

Images are made in fixed batches of `batch_size` (image i in batch i // batch_size; the last batch
is padded with the following prompts, so a batch is the same computation whatever the prompt
count). Each batch is a cached artifact keyed by its prompts and seeds, the model and sampler, the
quantized state's key and, for a corrector, its settings and the statistics' key. A killed run
resumes at the first missing batch with the same images; a sweep over K reuses the FP and quantized
batches. The run dir gets copies, never links into the cache.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from qdrift.cache import Artifact, atomic_save_image, copy_file, plain
from qdrift.distributed import barrier, shard, world
from qdrift.drift import CORRECTOR_VERSIONS, CalibrationPool, make_corrector, wrap_scheduler
from qdrift.progress import progress
from qdrift.prompts import to_pil
from qdrift.quant import quant_enabled

from .context import batches
from .error_map import map_key, mean_error_map
from .sampling import call_pipeline

log = logging.getLogger("qdrift")
GENERATE_VERSION = 1   # bump when a change to image making (pipeline call, PNG encoding) alters images


def variants(ctx) -> dict[str, dict | None]:
    """Variant name -> corrector config (None for the FP and quantized baselines)."""
    out = {"fp": None, "quant": None}
    out.update({name: plain(c) for name, c in (ctx.cfg.corrector or {}).items()})
    return out


def corrector_for(ctx, name: str, spec: dict, pool: CalibrationPool, with_map: bool = True):
    """The variant's corrector; `with_map=False` leaves out the mean error map (diagnostics that do not need it)."""
    options = {k: v for k, v in spec.items() if k not in ("kind", "pooling")}
    stats = pool.fit(int(ctx.cfg.calib.num_runs), spec.get("pooling", "scalar"))
    stats.check_compatible(ctx.settings())
    hook = make_corrector(spec["kind"], stats, ctx.family.latent_layout, **options)
    if with_map and spec.get("mean_map_runs"):
        hook.use_mean_map(mean_error_map(ctx, int(spec["mean_map_runs"])))
    return hook


def variant_key(ctx, spec: dict | None, quantized: bool) -> dict:
    """Everything a variant's images depend on except the batch's prompts and seeds."""
    key = {**ctx.sampling_key(), "quant": ctx.quant_art.key if quantized and ctx.quant_art is not None else None,
           "batch_size": int(ctx.cfg.batch_size), "code": GENERATE_VERSION, "corrector": None}
    if spec is not None:
        key |= {"corrector": spec, "corrector_version": CORRECTOR_VERSIONS[spec["kind"]], "stats": ctx.stats_key}
        if spec.get("mean_map_runs"):
            key["mean_map"] = map_key(ctx, int(spec["mean_map_runs"]))
    return key


def batch_artifacts(ctx, key: dict) -> list[tuple[Artifact, list[int]]]:
    seed = int(ctx.cfg.seed)
    return [(Artifact(ctx.cache_dir, "images", {**key, "prompts": [ctx.batch_prompts[i] for i in batch],
                                                "seeds": [seed + i for i in batch]}, seed=seed), batch)
            for batch in batches(len(ctx.prompts), int(ctx.cfg.batch_size))]


def generate_stage(ctx, pool: CalibrationPool | None) -> dict[str, Path]:
    """Every variant's images; under torchrun each rank makes its share of all variants' batches."""
    plan = {name: batch_artifacts(ctx, variant_key(ctx, spec, name != "fp" and ctx.quantized))
            for name, spec in variants(ctx).items()}
    # Batch j of all variants, in order, goes to rank j mod N: a balanced share, the same on every rank.
    mine = {id(art) for art, _ in shard([item for arts in plan.values() for item in arts])}
    for name, spec in variants(ctx).items():
        todo = [(art, batch) for art, batch in plan[name] if id(art) in mine and not art.verify()]
        # Checks the statistics; the mean error map (heavy) only when images are to be made.
        hook = corrector_for(ctx, name, spec, pool, with_map=bool(todo)) if spec is not None else None
        if not todo:
            if not world().distributed:   # a rank may simply own none of this variant's batches
                log.info("%s: %d images cached", name, len(ctx.prompts))
            continue
        scheduler = wrap_scheduler(ctx.base_scheduler, hook)
        start = time.perf_counter()
        with quant_enabled(ctx.denoiser, name != "fp" and ctx.quantized):
            for art, batch in progress(todo, desc=f"generate {name}", unit="batch"):
                art.ensure(lambda staging, b=batch: _render(ctx, b, scheduler, staging), quiet=True)
        # Seconds per image of this variant, over this process's computed batches (padding included).
        ctx.timings[f"s_per_image/{name}"] = round((time.perf_counter() - start) / (len(todo) * len(todo[0][1])), 4)
    for name, arts in plan.items():   # each rank copies its share into the run dir
        _expose(ctx, name, [item for item in arts if id(item[0]) in mine])
    barrier()   # every image is in place before any rank extracts features
    return {name: ctx.run_dir / "images" / name for name in plan}


def _render(ctx, batch: list[int], scheduler, staging: Path) -> None:
    seed = int(ctx.cfg.seed)
    images = call_pipeline(ctx, [ctx.batch_prompts[i] for i in batch], [seed + i for i in batch], scheduler)
    for j, img in enumerate(images):
        atomic_save_image(to_pil(img.float()), staging / f"{j}.png")


def _expose(ctx, name: str, arts) -> None:
    """images/<variant>/<index>.png in the run dir: copies of the evaluated images (not the padding)."""
    dst = ctx.run_dir / "images" / name
    n = len(ctx.prompts)
    for art, batch in arts:
        for j, i in enumerate(batch):
            if i < n:
                copy_file(art.file(f"{j}.png"), dst / f"{i}.png")
