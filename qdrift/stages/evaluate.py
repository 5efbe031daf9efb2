"""evaluate: FID/KID vs references, FID/PSNR/SSIM vs FP, CLIP score, bootstrap CI of the FID change."""
from __future__ import annotations

import logging
from pathlib import Path

from qdrift.cache import Artifact, copy_file, text_hash
from qdrift.distributed import barrier, main_first, shard, world
from qdrift.eval import ClipImageFeatures, ClipScorer, InceptionFeatures, PixelFeatures, evaluate_variants, load_openclip
from qdrift.eval.features import feature_cache
from qdrift.models.identity import file_digest

log = logging.getLogger("qdrift")


def feature_extractor(ctx):
    e = ctx.cfg.eval
    if e.features == "pixels":
        return PixelFeatures()
    if e.features == "inception":
        return InceptionFeatures(e.get("inception_weights"), ctx.device)
    clip = _bench_clip(ctx)
    return ClipImageFeatures(clip.model, clip.image_size, clip.mean, clip.std, ctx.device, name="benchclip")


def clip_scorer(ctx):
    e = ctx.cfg.eval
    if e.clip == "none":
        return None
    if e.clip == "bench":
        c = _bench_clip(ctx)
        return ClipScorer(c.model, c.tokenize, c.image_size, c.mean, c.std, ctx.device)
    loaded = load_openclip(e.clip_arch, e.get("clip_pretrained"), e.get("clip_weights"), ctx.device)
    return ClipScorer(*loaded, device=ctx.device)


def _bench_clip(ctx):
    if not hasattr(ctx, "_bench_clip"):
        from qdrift.bench import load_eval_clip

        ctx._bench_clip = load_eval_clip(ctx.device)
    return ctx._bench_clip


REFERENCES_VERSION = 1   # bump when a change to reference rendering alters the images
METRIC_BATCH = 32        # fixed, so per-image metrics never depend on the run's batch size


def reference_dir(ctx) -> Path | None:
    """References for the evaluation prompts, cached once and copied into the run dir (index-aligned)."""
    e = ctx.cfg.eval
    if e.reference == "none":
        return None
    res = int(ctx.cfg.model.resolution)
    n = len(ctx.prompts)
    sources = None
    if e.reference == "directory":   # copies of files on disk: their bytes are the input, not their path
        sources = text_hash([file_digest(ctx.prompt_set.reference_path(i)) for i in range(n)])
    art = Artifact(ctx.cache_dir, "references", {
        "prompt_set": e.prompt_set, "prompts": text_hash(ctx.prompts), "resolution": res, "source": e.reference,
        "source_files": sources, "code": REFERENCES_VERSION})
    art.ensure(lambda staging: ctx.prompt_set.write_references(list(range(n)), ctx.prompts, staging, res))
    dst = ctx.run_dir / "references"
    for i in range(n):
        copy_file(art.file(f"{i}.png"), dst / f"{i}.png")
    return dst


def evaluate_stage(ctx, dirs: dict[str, Path]) -> dict[str, dict[str, float]] | None:
    """Every metric, on rank 0; under torchrun the ranks first extract features of a share of the
    directories each (cached next to the images, where rank 0 then reads them). None on other ranks."""
    e = ctx.cfg.eval
    main = world().is_main
    with main_first():
        refs = reference_dir(ctx) if main else (None if e.reference == "none" else ctx.run_dir / "references")
    features = feature_extractor(ctx)
    if world().distributed:
        for d in shard([*dirs.values(), *([refs] if refs is not None else [])]):
            feature_cache(d, features)
        barrier()
    if not main:
        return None
    return evaluate_variants(
        dirs, ctx.prompts, refs, features, clip_scorer(ctx),
        fp="fp", baseline="quant", num_resamples=int(e.num_resamples), seed=int(ctx.cfg.seed),
        kid_subset_size=min(int(e.kid_subset_size), len(ctx.prompts)), lpips_weights=e.get("lpips_weights"),
        batch_size=METRIC_BATCH, device=ctx.device,
    )
