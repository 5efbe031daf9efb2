"""The mean error map (drift/error_map.py) of R calibration runs, for Q-Drift's `mean_map_runs`.

The runs are the calibration prompts and seeds 0..R-1 (those of the Q-Drift statistics, continued),
teacher forced on the FP trajectory as in calibration. They run in chunks of MAP_CHUNK, a constant,
each chunk a cached artifact with its sums: the map is a function of R, the runs and the quantized model,
not of `calib.batch_size`, and a larger R reuses the whole chunks it shares with a smaller one. Under
torchrun each rank builds its share of the chunks, then waits on the others' locks and reads them all.
"""
from __future__ import annotations

import logging
import time

import torch

from qdrift.cache import Artifact, atomic_write_bytes, config_key, read_safetensors, safetensors_bytes
from qdrift.distributed import shard
from qdrift.drift import calibrate_batch
from qdrift.drift.error_map import SHRINKAGE_VERSION, ErrorMapAccumulator, ErrorSums
from qdrift.progress import progress

from .calibrate import paired_runs

log = logging.getLogger("qdrift")
MAP_CHUNK = 8            # runs per pipeline call (and per cached artifact)
MAP_FILE = "error_map.safetensors"
MAP_FORMAT = "qdrift-error-map/2"
MAP_VERSION = 2          # bump when a change alters what a chunk records (2: each run's channel mean squared)
SUMS = {"total", "total_sq", "channel_sq"}


def map_plan(ctx, runs: int) -> list[tuple[Artifact, list[str], list[int]]]:
    """The chunks that hold runs 0..runs-1: (artifact, prompts, seeds) each."""
    prompts, seed = ctx.prompt_set.calib_prompts(runs), int(ctx.cfg.calib.seed)
    plan = []
    for start in range(0, runs, MAP_CHUNK):
        idx = range(start, min(start + MAP_CHUNK, runs))
        chunk_prompts, seeds = [prompts[i] for i in idx], [seed + i for i in idx]
        art = Artifact(ctx.cache_dir, "error_map", {
            **ctx.sampling_key(), "quant": ctx.quant_art.key if ctx.quant_art is not None else None,
            "prompts": chunk_prompts, "seeds": seeds, "layout": ctx.family.latent_layout, "algorithm": MAP_VERSION,
        })
        plan.append((art, chunk_prompts, seeds))
    return plan


def map_key(ctx, runs: int) -> str:
    """What the shrunk map of `runs` runs is (a corrector variant's images key on it)."""
    return config_key([art.key for art, _, _ in map_plan(ctx, runs)], SHRINKAGE_VERSION)


def mean_error_map(ctx, runs: int) -> torch.Tensor:
    """(S, C, P) shrunk mean error of runs 0..runs-1: chunks computed once and then read from the cache,
    the map itself kept for the rest of the run."""
    if runs in ctx.mean_maps:
        return ctx.mean_maps[runs]
    plan = map_plan(ctx, runs)
    mine = {id(item[0]) for item in shard(plan)}
    todo = [item for item in plan if id(item[0]) in mine and not item[0].verify()]
    start = time.perf_counter()
    if todo:
        log.info("mean error map: %d of %d chunks of %d runs to compute", len(todo), len(plan), MAP_CHUNK)
    def ensure(art, prompts, seeds):
        art.ensure(lambda staging: _map_chunk(ctx, prompts, seeds, staging))

    for item in progress(todo, desc="mean error map", unit="chunk", disable=not todo):
        ensure(*item)
    sums = None
    for art, prompts, seeds in plan:   # the other ranks' chunks: wait on their locks, or build what is missing
        ensure(art, prompts, seeds)
        tensors, _ = read_safetensors(art.file(MAP_FILE), MAP_FORMAT, SUMS)
        part = ErrorSums(tensors["total"], tensors["total_sq"], tensors["channel_sq"], len(seeds))
        sums = part if sums is None else sums + part
    ctx.timings[f"error_map/{runs}"] = round(time.perf_counter() - start, 3)
    ctx.mean_maps[runs] = sums.shrunk_mean()
    return ctx.mean_maps[runs]


def _map_chunk(ctx, prompts: list[str], seeds: list[int], staging) -> dict:
    acc = ErrorMapAccumulator(int(ctx.cfg.sampler.steps), ctx.family.latent_layout)
    calibrate_batch(paired_runs(ctx, prompts, seeds), ctx.base_scheduler, acc.num_steps, accumulator=acc)
    sums = acc.sums()
    atomic_write_bytes(staging / MAP_FILE, safetensors_bytes(
        {"total": sums.total, "total_sq": sums.total_sq, "channel_sq": sums.channel_sq}, MAP_FORMAT, {"runs": sums.runs}))
    return {"runs": sums.runs}
