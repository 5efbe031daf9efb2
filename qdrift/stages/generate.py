"""generate: the evaluation prompts once per variant (FP, quantized, each corrector), same seeds.

Images are cached per variant in `<cache>/images/<key>/<index>.png`, written one by one
(atomically) in fixed batches, so a killed run resumes where it stopped and produces the same
images, and a sweep over K reuses the FP and quantized images. The run dir gets hard links.
"""
from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from qdrift.cache import Artifact, atomic_save_image, link_or_copy, plain
from qdrift.drift import CalibrationPool, make_corrector, wrap_scheduler
from qdrift.prompts import to_pil
from qdrift.quant import quant_enabled

from .calibrate import pool_artifact
from .sampling import call_pipeline

log = logging.getLogger("qdrift")


def variants(ctx) -> dict[str, dict | None]:
    """Variant name -> corrector config (None for the FP and quantized baselines)."""
    out = {"fp": None, "quant": None}
    out.update({name: plain(c) for name, c in (ctx.cfg.corrector or {}).items()})
    return out


def corrector_for(ctx, name: str, spec: dict, pool: CalibrationPool):
    options = {k: v for k, v in spec.items() if k not in ("kind", "pooling")}
    stats = pool.fit(int(ctx.cfg.calib.num_runs), spec.get("pooling", "scalar"))
    stats.check_compatible(ctx.settings())
    return make_corrector(spec["kind"], stats, ctx.family.latent_layout, **options)


def generate_stage(ctx, pool: CalibrationPool | None) -> dict[str, Path]:
    dirs = {}
    for name, spec in variants(ctx).items():
        quantized = name != "fp" and ctx.quantized
        key = {**ctx.sampling_key(), "quant": ctx.quant_key() if quantized else None, "seed": int(ctx.cfg.seed)}
        hook = None
        if spec is not None:
            hook = corrector_for(ctx, name, spec, pool)
            key |= {"corrector": spec, "calib": pool_artifact(ctx).key, "num_runs": int(ctx.cfg.calib.num_runs)}
        art = Artifact(ctx.cache_dir, "images", key, seed=int(ctx.cfg.seed))
        _generate(ctx, name, art, wrap_scheduler(ctx.base_scheduler, hook), quantized)
        dirs[name] = _expose(ctx, name, art.path)
    return dirs


def _generate(ctx, name: str, art: Artifact, scheduler, quantized: bool) -> None:
    n, bs, seed = len(ctx.prompts), int(ctx.cfg.batch_size), int(ctx.cfg.seed)
    batches = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
    todo = [b for b in batches if not all((art.path / f"{i}.png").is_file() for i in b)]
    if not art.manifest_path.is_file():
        art.finish(variant=name)  # describes the directory; completeness is per image file
    if not todo:
        log.info("%s: %d images cached in %s", name, n, art.path)
        return
    with quant_enabled(ctx.denoiser, quantized):
        for batch in tqdm(todo, desc=f"generate {name}", unit="batch"):
            images = call_pipeline(ctx, [ctx.prompts[i] for i in batch], [seed + i for i in batch], scheduler)
            for i, img in zip(batch, images):
                path = art.path / f"{i}.png"
                if not path.is_file():
                    atomic_save_image(to_pil(img.float()), path)


def _expose(ctx, name: str, src: Path) -> Path:
    dst = ctx.run_dir / "images" / name
    for i in range(len(ctx.prompts)):
        link_or_copy(src / f"{i}.png", dst / f"{i}.png")
    return dst
