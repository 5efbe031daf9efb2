"""Prompt sets: evaluation and calibration prompts (disjoint), and FID reference images.

- builtin: a small grammar over the tiny models' vocabulary (smoke runs, tests); no references.
- bench:   held-out captions of the procedural bench dataset; references rendered from them.
- mjhq:    MJHQ-30K (the paper's evaluation set) from a local copy: the first `num_prompts` ids
           in sorted order evaluate, the rest calibrate; references are MJHQ's own images.

Every set says how many prompts each split has (`max_eval`, `max_calib`; None: more than any run
needs), so a run asking for more is refused before it starts.

`eval.pool=tune` (bench) evaluates prompts of the tune pool instead: calibration-split captions that are
neither evaluation nor calibration prompts, for tuning hyperparameters (README, "Beyond the paper").

Replicates (README, "Replicates"): `eval.split=s` evaluates prompts [s n, (s + 1) n) of the evaluation
pool (n = eval.num_prompts; `start` = s n), so splits are disjoint and split 0 is the first n prompts.
PTQ calibration draws its prompts with `quant.seed` (`calib_prompts(n, seed)`): seed 0 takes the first
n calibration prompts (what the Q-Drift calibration runs also use), another seed a seeded draw.
"""
from __future__ import annotations

import functools
import itertools
import json
import random
from pathlib import Path

import torch

from .cache import atomic_save_image


class PromptSetUnavailable(RuntimeError):
    pass


class BuiltinPrompts:
    """Deterministic toy prompts; even indices evaluate, odd ones calibrate."""

    name = "builtin"
    has_references = False

    def __init__(self, start: int = 0):
        self.start = start
        counts = ["a", "one", "two", "three"]
        sizes = ["small", "large"]
        colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
        shapes = ["circle", "square", "triangle", "star", "cross", "ring"]
        grounds = ["red", "blue", "yellow", "white", "black", "green"]
        combos = itertools.product(counts, sizes, colours, shapes, grounds)
        self.all = [f"{c} {s} {col} {sh} on {g} background" for c, s, col, sh, g in combos if col != g]
        self.max_eval, self.max_calib = len(self.all[0::2]), len(self.all[1::2])

    def eval_prompts(self, n: int) -> list[str]:
        return self._take(self.all[0::2], n, self.start)

    def calib_prompts(self, n: int, seed: int = 0) -> list[str]:
        return self._take(self.all[1::2], n) if seed == 0 else _seeded_draw(self.all[1::2], n, f"builtin/{seed}")

    def _take(self, pool, n, start=0):
        if start + n > len(pool):
            raise ValueError(f"the builtin prompt set has {len(pool)} prompts per split, asked for {start + n}")
        # A fixed stride (prime, so a permutation of the pool) spreads the first n prompts over the
        # grammar instead of varying one word.
        return [pool[(i * 7919) % len(pool)] for i in range(start, start + n)]

    def write_references(self, indices, prompts, out_dir: Path, resolution: int) -> None:
        raise PromptSetUnavailable("the builtin prompt set has no reference images (use eval.reference=none)")


POOLS = ("eval", "tune")
# The tune pool (eval.pool=tune): prompts to tune hyperparameters on, never evaluation captions. A seeded
# draw of calibration-split captions of its own, without the first TUNE_EXCLUDE calibration captions (what
# Q-Drift's calibration runs and PTQ with quant.seed=0 take).
TUNE_SEED, TUNE_EXCLUDE = 999_999_999, 4096


@functools.lru_cache(maxsize=4)
def tune_captions(n: int) -> tuple[str, ...]:
    """The first n prompts of the bench tune pool (a larger n extends the list)."""
    from qdrift.bench import captions

    taken = set(captions("calib", TUNE_EXCLUDE))
    draw = n
    while True:
        pool = [c for c in captions("calib", draw, TUNE_SEED) if c not in taken]
        if len(pool) >= n:
            return tuple(pool[:n])
        draw += n - len(pool) + 16


class BenchPrompts:
    name = "bench"
    has_references = True
    max_eval = max_calib = None   # hundreds of millions of captions per split

    def __init__(self, start: int = 0, pool: str = "eval"):
        if pool not in POOLS:
            raise ValueError(f"unknown prompt pool {pool!r}; choose one of {POOLS}")
        self.start, self.pool = start, pool

    def eval_prompts(self, n: int) -> list[str]:
        from qdrift.bench import captions

        if self.pool == "tune":
            return list(tune_captions(self.start + n)[self.start:])
        return captions("eval", self.start + n)[self.start:]   # distinct captions: splits are disjoint

    def calib_prompts(self, n: int, seed: int = 0) -> list[str]:
        from qdrift.bench import captions

        return captions("calib", n, seed)

    def write_references(self, indices, prompts, out_dir: Path, resolution: int) -> None:
        from qdrift.bench import reference_images

        # Reference i's render jitter depends on its index: render contiguous runs of indices.
        for run in _contiguous_runs(sorted(indices), max_len=256):
            images = reference_images([prompts[i] for i in run], start_index=run[0])
            if images.shape[-1] != resolution:
                images = torch.nn.functional.interpolate(images, size=resolution, mode="bilinear", antialias=True)
            for i, img in zip(run, images):
                atomic_save_image(to_pil(img), out_dir / f"{i}.png")


def _contiguous_runs(indices: list[int], max_len: int) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < max_len:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


class MJHQPrompts:
    """MJHQ-30K from a local directory: meta_data.json + <category>/<id>.jpg. The first `eval_split` ids
    in sorted order are the evaluation split, the rest calibrate."""

    name = "mjhq"
    has_references = True
    DOWNLOAD = ("Download MJHQ-30K (`hf download playgroundai/MJHQ-30K --repo-type dataset --local-dir DIR`, then "
                "unzip mjhq30k_imgs.zip so that DIR holds meta_data.json and the <category>/<id>.jpg folders) and "
                "run with eval.mjhq_dir=DIR")

    def __init__(self, root: str | None, eval_split: int = 5000, start: int = 0):
        self.start = start
        if not root:
            raise PromptSetUnavailable(f"eval.mjhq_dir is not set. {self.DOWNLOAD}")
        self.root = Path(root)
        meta = self.root / "meta_data.json"
        if not self.root.is_dir():
            raise PromptSetUnavailable(f"eval.mjhq_dir={root} is not a directory. {self.DOWNLOAD}")
        if not meta.is_file():
            raise PromptSetUnavailable(f"{meta} not found: eval.mjhq_dir must hold MJHQ-30K's meta_data.json. "
                                       f"{self.DOWNLOAD}")
        try:
            data = json.loads(meta.read_text())
            if not all("prompt" in v and "category" in v for v in data.values()):
                raise ValueError("entries need 'prompt' and 'category'")
        except (ValueError, AttributeError, OSError) as err:
            raise PromptSetUnavailable(f"{meta} is not MJHQ-30K's meta_data.json ({err})") from None
        self.ids = sorted(data)
        self.meta = data
        # A fixed split, not the run's prompt count: image i and the calibration prompts must not
        # change when eval.num_prompts does (the paper evaluates on 5,000 prompts).
        self.eval_split = min(int(eval_split), len(self.ids))
        self.max_eval, self.max_calib = self.eval_split, len(self.ids) - self.eval_split

    def eval_prompts(self, n: int) -> list[str]:
        if self.start + n > self.eval_split:
            raise ValueError(f"asked for evaluation prompts [{self.start}, {self.start + n}), the split has "
                             f"{self.eval_split}")
        return [self.meta[i]["prompt"] for i in self.ids[self.start:self.start + n]]

    def calib_prompts(self, n: int, seed: int = 0) -> list[str]:
        rest = self.ids[self.eval_split:]
        if n > len(rest):
            raise ValueError(f"asked for {n} calibration prompts, MJHQ has {len(rest)} outside the evaluation split")
        return [self.meta[i]["prompt"] for i in (rest[:n] if seed == 0 else _seeded_draw(rest, n, f"mjhq/{seed}"))]

    def reference_path(self, i: int) -> Path:
        """The reference of evaluation prompt i of this run (its split's i-th)."""
        key = self.ids[self.start + i]
        return self.root / self.meta[key]["category"] / f"{key}.jpg"

    def write_references(self, indices, prompts, out_dir: Path, resolution: int) -> None:
        from PIL import Image

        for i in indices:
            src = self.reference_path(i)
            if not src.is_file():
                raise PromptSetUnavailable(f"MJHQ reference image {src} is missing")
            img = Image.open(src).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
            atomic_save_image(img, out_dir / f"{i}.png")


def _seeded_draw(pool: list, n: int, seed: str) -> list:
    """n distinct items of `pool`, drawn by a seeded RNG (the same arguments, the same list)."""
    if n > len(pool):
        raise ValueError(f"asked for {n} calibration prompts, the split has {len(pool)}")
    return random.Random(f"qdrift-calib-prompts/{seed}").sample(pool, n)


def eval_start(eval_cfg) -> int:
    """The first evaluation prompt of the run's split: eval.split * eval.num_prompts."""
    return int(eval_cfg.get("split", 0)) * int(eval_cfg.num_prompts)


def prompt_set(eval_cfg):
    """The run's prompt set; its `eval_prompts(n)` are the n prompts of split `eval.split`."""
    name, start = eval_cfg.prompt_set, eval_start(eval_cfg)
    if name == "builtin":
        return BuiltinPrompts(start)
    pool = eval_cfg.get("pool", "eval")
    if pool != "eval" and name != "bench":
        raise ValueError(f"eval.pool={pool} needs eval.prompt_set=bench (the {name} set has no tune pool)")
    if name == "bench":
        return BenchPrompts(start, pool)
    if name == "mjhq":
        return MJHQPrompts(eval_cfg.get("mjhq_dir"), int(eval_cfg.get("eval_split", 5000)), start)
    raise ValueError(f"unknown prompt set {name!r}; choose builtin, bench or mjhq")


def to_pil(image: torch.Tensor):
    """(3, H, W) float in [0, 1] -> PIL image (rounded to 8 bits)."""
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)
