"""What the stages of one run share: the config, directories, device, the loaded pipeline, timings."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from qdrift.cache import plain
from qdrift.models.families import Family, get_family
from qdrift.models.loaders import resolve_dtype

log = logging.getLogger("qdrift")

# Seed ranges (evaluation image i: seed + i; Q-Drift calibration run k: calib.seed + k).
QUANT_SEED_OFFSET = 5_000_000   # PTQ calibration image j: calib.seed + QUANT_SEED_OFFSET + j


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
    timings: dict[str, float] = field(default_factory=dict)

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

    # --- config subsets that key the caches ---------------------------------------------------
    def model_key(self) -> dict:
        m = plain(self.cfg.model)
        return {k: m.get(k) for k in ("name", "family", "source", "hub_id", "revision", "local_path", "variant")} | {
            "device": self.device.type, "dtype": str(self.dtype)}

    def sampling_key(self) -> dict:
        s = plain(self.cfg.sampler)
        return self.model_key() | {
            "sampler": s["name"], "steps": s["steps"], "guidance": float(s["guidance"]), "options": s.get("options") or {},
            "resolution": self.cfg.model.resolution, "max_sequence_length": self.cfg.model.get("max_sequence_length"),
        }

    def quant_key(self) -> dict | None:
        return plain(self.cfg.quant) if self.quantized else None

    def settings(self) -> dict:
        """What Q-Drift statistics must agree on with the run that uses them."""
        return {
            "model": self.cfg.model.name, "quant": self.cfg.quant.name, "sampler": self.cfg.sampler.name,
            "steps": self.cfg.sampler.steps, "guidance": float(self.cfg.sampler.guidance),
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
