"""quantize: turn the denoiser into its fake-quantized twin, or load the cached twin."""
from __future__ import annotations

import logging

import torch

from qdrift.cache import Artifact, plain, text_hash
from qdrift.progress import progress
from qdrift.quant import QuantSpec, QuantStateMismatch, algorithm_version, load_quant_state, quantize, save_quant_state
from qdrift.quant.state import FORMAT_VERSION

from .context import ptq_seed_start
from .sampling import call_pipeline

log = logging.getLogger("qdrift")


def quant_artifact(ctx) -> Artifact:
    """The quantized state depends on the model and its weights, the sampler (PTQ calibration runs
    along the model's own trajectory), every quant setting (quant.seed included), the algorithm's code
    version, the exact calibration prompts and seeds, and the batch size they ran in. Not on calib.seed:
    the Q-Drift calibration seed and the quantized model are separate axes of a replicate."""
    cfg = ctx.cfg
    spec = QuantSpec.from_config(cfg.quant)
    return Artifact(ctx.cache_dir, "quant", {
        **ctx.sampling_key(), "quant": plain(cfg.quant), "algorithm": algorithm_version(spec),
        "state_format": FORMAT_VERSION, "prompts": text_hash(ptq_prompts(ctx, spec)),
        "seed": ptq_seed(ctx), "batch_size": int(cfg.batch_size),
    })


def ptq_prompts(ctx, spec: QuantSpec) -> list[str]:
    """quant.seed 0: the first calibration prompts; another seed: its own draw of them (prompts.py)."""
    return ctx.prompt_set.calib_prompts(spec.calib_prompts, seed=spec.seed)


def ptq_seed(ctx) -> int:
    """PTQ calibration prompt j uses noise seed ptq_seed + j (stages/context.py: disjoint from the
    evaluation and Q-Drift calibration seeds of the same replicate)."""
    return ptq_seed_start(ctx.cfg.quant.get("seed", 0))


def quantize_stage(ctx) -> dict | None:
    """Quantize in place; returns the quantizer's summary (None when quant=none)."""
    if not ctx.quantized:
        return None
    spec = QuantSpec.from_config(ctx.cfg.quant)
    art = ctx.quant_art = quant_artifact(ctx)
    built = []

    # Beside the cache entry, not in its staging dir: a killed build's staging dir is removed.
    journal = art.path.with_name(f"{art.key}.sensitivity.json")

    def build(staging):
        report = quantize(ctx.denoiser, spec, ctx.family.name, _ptq_calibration(ctx, spec), progress=True,
                          resume_file=journal)
        save_quant_state(ctx.denoiser, staging / "state.safetensors")
        journal.unlink(missing_ok=True)
        built.append(True)
        return {"report": report.to_dict() if hasattr(report, "to_dict") else {"summary": report.summary()}}

    art.ensure(build)
    if not built:
        try:
            load_quant_state(ctx.denoiser, spec, ctx.family.name, art.file("state.safetensors"))
        except QuantStateMismatch as err:   # never run a state next to weights it was not made from
            log.warning("cache: %s; recomputing it", err)
            art.discard()
            art.ensure(build)
        else:
            log.info("quantized model loaded from cache %s", art.path)
    return art.manifest().get("report")


def _ptq_calibration(ctx, spec: QuantSpec):
    prompts, seed0, bs = ptq_prompts(ctx, spec), ptq_seed(ctx), int(ctx.cfg.batch_size)

    def calibrate(num_prompts: int) -> torch.Tensor:
        """Run the FP pipeline (its own trajectory) on the first `num_prompts` calibration prompts."""
        images = []
        starts = range(0, num_prompts, bs)
        for start in progress(starts, desc="PTQ calibration", unit="batch", nested=True, disable=len(starts) <= 1):
            idx = range(start, min(start + bs, num_prompts))
            images.append(call_pipeline(ctx, [prompts[i] for i in idx], [seed0 + i for i in idx], ctx.base_scheduler))
        return torch.cat(images)

    return calibrate
