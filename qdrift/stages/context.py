"""What the stages of one run share: the config, directories, device, the loaded pipeline, timings."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from qdrift.cache import plain, versions
from qdrift.models.families import Family, get_family
from qdrift.models.loaders import resolve_dtype
from qdrift.samplers import sampler_eta

log = logging.getLogger("qdrift")

# Seed ranges (evaluation image i: seed + i; Q-Drift calibration run k: calib.seed + k; PTQ calibration
# image j: ptq_seed_start(quant.seed) + j). Replicate r (conf/config.yaml) owns the block of seeds
# [r * SEED_BLOCK, (r + 1) * SEED_BLOCK): evaluation from its start, Q-Drift calibration from + 1,000,000,
# PTQ calibration from + PTQ_SEED_OFFSET (replicate 0: 0, 1,000,000 and 6,000,000, the seeds of before).
SEED_BLOCK = 10_000_000
PTQ_SEED_OFFSET = 6_000_000


def ptq_seed_start(quant_seed: int) -> int:
    """The noise seed of PTQ calibration image 0 (image j: + j); quant.seed alone decides it."""
    return PTQ_SEED_OFFSET + int(quant_seed) * SEED_BLOCK


def replicate_seed(replicate, offset=0) -> int:
    """`${replicate_seed:${replicate},offset}` in the yaml defaults: seed `offset` of replicate r's block."""
    return int(offset) + int(replicate) * SEED_BLOCK


def device_kind(device: torch.device) -> str:
    """The device as far as it can change floating-point results: another GPU model may round differently."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    # CPU kernels split reductions over threads, so another thread count rounds differently (measured:
    # 1 vs 2 threads change a few PNGs of a tiny run; torchrun starts each rank with one thread).
    return f"{device.type}:{torch.get_num_threads()} threads"


def software_versions() -> dict[str, str]:
    """The libraries whose kernels and pipelines compute every number (an upgrade may change them)."""
    return {k: v for k, v in versions().items() if k in ("torch", "diffusers", "transformers")}


def batches(n: int, size: int) -> list[list[int]]:
    """Fixed batch boundaries [0, size), [size, 2 size), ...; the last batch is padded to `size` indices
    (past n) so that every batch, and so every floating-point result, is the same whatever n is."""
    return [list(range(start, start + size)) for start in range(0, n, size)]


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    prompts: list[str]
    prompt_set: object
    family: Family = field(init=False)
    pipe: object = None
    base_scheduler: object = None       # the sampler's plain scheduler (FP and quantized variants)
    weights: dict | None = None         # identity of the loaded weights (models/identity.py), set by build
    quant_art: object = None            # the quantize stage's Artifact (None without quantization)
    stats_key: str | None = None        # the calibrate stage's blocks + K (stages/calibrate.py)
    batch_prompts: list[str] = field(default_factory=list)   # prompts padded to whole batches
    timings: dict[str, float] = field(default_factory=dict)
    mean_maps: dict[int, torch.Tensor] = field(default_factory=dict)   # stages/error_map.py, per number of runs

    def __post_init__(self):
        self.family = get_family(self.cfg.model.family)

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.cache_dir)

    @property
    def denoiser(self):
        from qdrift.models.families import denoiser_of

        return denoiser_of(self.pipe)

    @property
    def dtype(self) -> torch.dtype:
        return resolve_dtype(self.cfg.model.get("dtype", "float32"), self.device)

    @property
    def quantized(self) -> bool:
        return self.cfg.quant.method != "none"

    # --- what keys the caches (keys chain: see qdrift/cache.py) ------------------------------
    def model_key(self) -> dict:
        """The model config, where it runs and the identity of the weights actually loaded (set by build)."""
        if self.weights is None:
            raise RuntimeError("the model's weights identity is known only after the build stage")
        return {"model": plain(self.cfg.model), "device": device_kind(self.device), "dtype": str(self.dtype),
                "weights": self.weights, "software": software_versions()}

    def sampling_key(self) -> dict:
        """The model's key and the whole sampler config: steps, guidance, scheduler options and step arguments
        (DDIM's eta: images and statistics of another eta never mix; eta = 0, what runs without it, keys as absent)."""
        sampler = plain(self.cfg.sampler)
        options = sampler.get("options") or {}
        if "eta" in options:
            eta = float(options["eta"])
            sampler["options"] = {k: v for k, v in options.items() if k != "eta"} | ({"eta": eta} if eta else {})
        return self.model_key() | {"sampler": sampler}

    def settings(self) -> dict:
        """What Q-Drift statistics must agree on with the run that uses them."""
        return {
            "model": self.cfg.model.name, "quant": self.cfg.quant.name, "sampler": self.cfg.sampler.name,
            "steps": self.cfg.sampler.steps, "guidance": float(self.cfg.sampler.guidance),
            "eta": sampler_eta(self.cfg.sampler),
            "resolution": self.cfg.model.resolution, "prediction": self.cfg.model.prediction,
            "layout": self.family.latent_layout,
        }

    @contextmanager
    def stage(self, name: str):
        log.info("[%s] ...", name)
        start = time.perf_counter()
        yield
        took = time.perf_counter() - start
        self.timings[name] = round(took, 3)
        log.info("[%s] done in %.1fs", name, took)
