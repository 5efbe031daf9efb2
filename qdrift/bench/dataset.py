"""The bench dataset: seeded scene/caption samples per split, and rendered images for them.

Splits are decided by a stable hash of the canonical caption, so a caption belongs to exactly one
of train / calib / eval, whatever seed or sample size asked for it.

Seed scheme (every image comes from `render.render(scenes, seed, start_index)`, whose jitter for
image i depends only on (seed, start_index + i), never on batching or device):
    * training images:      render seed TRAIN_RENDER_SEED + training seed  (0 .. 999_999)
    * FID references:       render seed REFERENCE_RENDER_SEED + seed        (1_000_000 and up)
    * CLIP retrieval pairs: references of eval captions (the CLIP trains on the train split only)
Scenes are drawn by a Python RNG per (split, seed); the training set is cut into chunks of
CHUNK scenes with seeds seed * 100_000 + chunk, so it can be drawn in parallel and still be one list.
Generators' noise seeds belong to the runner. This module imports no torch at load time (worker
processes of the training script import it).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .grammar import Scene, caption_of, random_scene, random_swap, scene_of

if TYPE_CHECKING:
    import torch

SPLITS = {"train": (0, 80), "calib": (80, 90), "eval": (90, 100)}   # percent ranges of the caption hash
TRAIN_RENDER_SEED = 0
REFERENCE_RENDER_SEED = 1_000_000
CHUNK = 10_000


def split_of(caption: str) -> str:
    """The split a caption belongs to: a stable hash, independent of Python's hash seed."""
    bucket = int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "little") % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def scenes(split: str, n: int, seed: int = 0, unique: bool | None = None) -> list[Scene]:
    """`n` scenes of `split` drawn with `seed` (same arguments, same list; a larger n extends it).

    Prompt splits (calib, eval) return distinct captions; train draws with repetition (training should
    follow the scene distribution, not a caption list).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")
    unique = split != "train" if unique is None else unique
    rng = random.Random(f"qdrift-bench/{split}/{seed}")
    out: list[Scene] = []
    seen: set[str] = set()
    while len(out) < n:
        scene = random_scene(rng)
        cap = caption_of(scene)
        if split_of(cap) != split or (unique and cap in seen):
            continue
        seen.add(cap)
        out.append(scene)
    return out


def captions(split: str, n: int, seed: int = 0) -> list[str]:
    """Evaluation prompts = captions("eval", n); calibration prompts = captions("calib", n)."""
    return [caption_of(s) for s in scenes(split, n, seed)]


def training_chunk(seed: int, chunk: int, size: int, negatives: int) -> tuple[list[Scene], list[str], list[list[str]]]:
    """Chunk `chunk` of the training set: scenes, their captions, and `negatives` one-attribute swaps each."""
    sc = scenes("train", size, seed=seed * 100_000 + chunk)
    rng = random.Random(f"qdrift-bench/negatives/{seed}/{chunk}")
    return sc, [caption_of(s) for s in sc], [[caption_of(random_swap(s, rng)) for _ in range(negatives)] for s in sc]


def training_set(n: int, seed: int = 0, negatives: int = 0, workers: int = 1):
    """(scenes, captions, swapped captions) of the first n training scenes; identical for any `workers`."""
    sizes = [min(CHUNK, n - a) for a in range(0, n, CHUNK)]
    args = [(seed, c, size, negatives) for c, size in enumerate(sizes)]
    if workers > 1 and len(args) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        # fork: workers start at once and need no re-import of the caller's script; they run pure Python
        # (no CUDA, no tokenizers), so forking a process that has loaded torch is safe here.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(min(workers, len(args)), mp_context=mp.get_context(method)) as pool:
            parts = list(pool.map(training_chunk, *zip(*args)))
    else:
        parts = [training_chunk(*a) for a in args]
    return ([s for p in parts for s in p[0]], [c for p in parts for c in p[1]], [g for p in parts for g in p[2]])


def as_scenes(items: Sequence[str | Scene]) -> list[Scene]:
    return [scene_of(x) if isinstance(x, str) else x for x in items]


def reference_images(items: Sequence[str | Scene], seed: int = 0, device: str = "cpu",
                     start_index: int = 0) -> torch.Tensor:
    """FID reference images for captions (or scenes): [N, 3, 64, 64] in [0, 1], seeds disjoint from training.

    Image i uses jitter (REFERENCE_RENDER_SEED + seed, start_index + i), so references can be made in chunks.
    """
    from .render import render
    return render(as_scenes(items), seed=REFERENCE_RENDER_SEED + seed, device=device, start_index=start_index)
