"""The evaluation CLIP (open_clip architecture, small custom config) and the metrics built on it.

It is trained contrastively on the train split only (with one-attribute-swapped captions as hard
negatives) and never used by the generators, so it can judge them. Two metrics:
  * attribute accuracy: the true caption must outrank every one-attribute swap of it (per attribute:
    colour, shape, size, count, position, background; a few alternatives each);
  * retrieval accuracy: image -> caption top-1 among held-out pairs.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from open_clip.model import CLIP

from .grammar import ATTRIBUTES, MAX_TOKENS, Scene, caption_of, swaps
from .dataset import as_scenes
from .weights import weights_dir as resolve_dir

MEAN = (0.55, 0.52, 0.50)
STD = (0.28, 0.28, 0.30)


class EvalClip(NamedTuple):
    model: CLIP
    tokenize: Callable[[Sequence[str]], torch.Tensor]     # captions -> [N, 32] token ids
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_eval_clip(kwargs: dict) -> CLIP:
    return CLIP(kwargs["embed_dim"], vision_cfg=dict(kwargs["vision_cfg"]), text_cfg=dict(kwargs["text_cfg"]))


def make_tokenize(tokenizer) -> Callable[[Sequence[str]], torch.Tensor]:
    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(texts), padding="max_length", max_length=MAX_TOKENS, truncation=True,
                         return_tensors="pt").input_ids
    return tokenize


def load_eval_clip(device: str | torch.device = "cpu", weights_dir: str | Path | None = None) -> EvalClip:
    """(model, tokenize, image_size, mean, std) of the shipped evaluation CLIP, offline."""
    from .models import load_modules, load_tokenizer
    directory = resolve_dir(weights_dir)
    modules, meta = load_modules(directory / "eval_clip.safetensors")
    model = modules["clip"].to(device).float().eval()
    return EvalClip(model, make_tokenize(load_tokenizer(directory)), meta["image_size"],
                    tuple(meta["mean"]), tuple(meta["std"]))


def normalize(images: torch.Tensor, clip: EvalClip) -> torch.Tensor:
    mean = torch.tensor(clip.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(clip.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def image_features(clip: EvalClip, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit-norm features of images [N, 3, 64, 64] in [0, 1]."""
    dev = _device(clip.model)
    return torch.cat([clip.model.encode_image(normalize(images[a:a + batch_size].to(dev).float(), clip), normalize=True)
                      for a in range(0, len(images), batch_size)])


@torch.no_grad()
def text_features(clip: EvalClip, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
    dev = _device(clip.model)
    return torch.cat([clip.model.encode_text(clip.tokenize(texts[a:a + batch_size]).to(dev), normalize=True)
                      for a in range(0, len(texts), batch_size)])


def attribute_accuracy(images: torch.Tensor, items: Sequence[str | Scene], clip: EvalClip | None = None,
                       alternatives: int = 3, seed: int = 0,
                       attributes: Sequence[str] = ATTRIBUTES) -> dict[str, float]:
    """Per attribute, the fraction of images whose true caption outscores all its one-attribute swaps.

    `items` are the captions (or scenes) the images were made for. Returns {attribute: accuracy, "mean": ...}.
    """
    clip = clip or load_eval_clip()
    scenes = as_scenes(items)
    img = image_features(clip, images)
    texts, spans = [], []          # spans[i][attr] = (start, stop) into texts; texts[start] is the truth
    for i, scene in enumerate(scenes):
        rng = random.Random(f"attribute-accuracy/{seed}/{i}")
        row = {}
        for attr in attributes:
            alts = swaps(scene, attr, alternatives, rng)
            if alts:
                row[attr] = (len(texts), len(texts) + 1 + len(alts))
                texts += [caption_of(scene)] + [caption_of(s) for s in alts]
        spans.append(row)
    txt = text_features(clip, texts).to(img.device)
    hits: dict[str, list[bool]] = {a: [] for a in attributes}
    for i, row in enumerate(spans):
        for attr, (a, b) in row.items():
            scores = txt[a:b] @ img[i]
            hits[attr].append(bool(scores[0] > scores[1:].max()))
    acc = {a: sum(h) / len(h) for a, h in hits.items() if h}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc


def retrieval_accuracy(images: torch.Tensor, captions: Sequence[str], clip: EvalClip | None = None) -> float:
    """Image -> caption top-1 accuracy among the given (held-out, distinct) pairs."""
    clip = clip or load_eval_clip()
    img = image_features(clip, images)
    txt = text_features(clip, list(captions)).to(img.device)
    return (img @ txt.T).argmax(dim=1).eq(torch.arange(len(img), device=img.device)).float().mean().item()
