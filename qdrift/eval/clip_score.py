"""CLIP score (torchmetrics' definition, 100 * max(cos(image, text), 0)) with open_clip models."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdrift.eval.weights import require_weights_file

Tokenizer = Callable[[list[str]], Tensor]


def clip_preprocess(
    images: Tensor, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """CLIP's eval transform on tensors: resize the short side (bicubic, antialiased), centre-crop, normalise.

    Works on (N, 3, H, W) floats in [0, 1], so generated images never round-trip through PIL.
    """
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    scale = max(h / images.shape[-2], w / images.shape[-1])
    new = (max(h, round(images.shape[-2] * scale)), max(w, round(images.shape[-1] * scale)))
    x = images.float()
    if new != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=new, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
    top, left = (new[0] - h) // 2, (new[1] - w) // 2
    x = x[..., top : top + h, left : left + w]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class ClipScorer:
    """Per-image CLIP score of images against their prompts, with any open_clip-style model.

    `tokenizer` maps a list of prompts to a token tensor (N, context_length) that ``model.encode_text``
    accepts. ``ClipScorer(*load_openclip(...), device=...)`` builds one for a real model.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        image_size: int | Sequence[int],
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def _scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        x = clip_preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        img = F.normalize(self.model.encode_image(x).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)
        return 100.0 * (img * txt).sum(-1).clamp(min=0)

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """CLIP scores (N,) float32 on CPU for images (N, 3, H, W) in [0, 1] and their N prompts."""
        if images.shape[0] != len(prompts):
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        b = self.batch_size
        return torch.cat(
            [self._scores(images[s : s + b], list(prompts[s : s + b])).cpu() for s in range(0, len(prompts), b)]
        )


class LoadedClip(NamedTuple):
    """What `ClipScorer` needs, in its argument order."""

    model: nn.Module
    tokenizer: Tokenizer
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _download_hint(arch: str, pretrained: str | None) -> str:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    hints = []
    if cfg.get("hf_hub"):
        repo = cfg["hf_hub"].rstrip("/")
        hints.append(f"'open_clip_model.safetensors' from the Hugging Face repo {repo} (https://huggingface.co/{repo})")
    if cfg.get("url"):
        hints.append(cfg["url"])
    if not hints:
        return f"the open_clip checkpoint of {arch} (pretrained={pretrained!r})"
    return f"the {arch}/{pretrained} checkpoint: " + " or ".join(hints)


def clip_weights(arch: str, pretrained: str | None, weights_path: str | os.PathLike | None) -> Path:
    """`weights_path` if it is a file, else FileNotFoundError saying which checkpoint to get (eval.clip_weights)."""
    if weights_path is not None and Path(weights_path).is_file():
        return Path(weights_path)   # the hint below imports open_clip (seconds): only when it is needed
    return require_weights_file(weights_path, f"CLIP weights for {arch}", _download_hint(arch, pretrained),
                                "eval.clip_weights")


def load_openclip(
    arch: str = "ViT-L-14-quickgelu",
    pretrained: str | None = "openai",
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> LoadedClip:
    """An open_clip model from a local checkpoint, its tokenizer and its eval preprocessing constants.

    `pretrained` names the tag the checkpoint came from; it is only used for its preprocessing
    constants (mean/std, QuickGELU) and to say what to download. Nothing is fetched: without a local
    file this raises FileNotFoundError naming the file and the config key ``eval.clip_weights``.
    """
    import open_clip

    path = clip_weights(arch, pretrained, weights_path)
    cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained else {}
    model = open_clip.create_model(
        arch, pretrained=str(path), device=device, force_quick_gelu=bool(cfg.get("quick_gelu", False))
    ).eval()
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(cfg.get("mean") or pp.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(cfg.get("std") or pp.get("std") or open_clip.OPENAI_DATASET_STD)
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return LoadedClip(model, open_clip.get_tokenizer(arch), size, mean, std)
