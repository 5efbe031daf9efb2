"""Reading the image directories the generate stage writes: ``<dir>/<index>.png``, index = prompt index."""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

_NAME = re.compile(r"^(0|[1-9][0-9]*)\.png$")


def image_indices(directory: str | Path) -> list[int]:
    """Sorted prompt indices of the ``<index>.png`` files in `directory` (other files are ignored).

    Raises ValueError when the directory is missing or holds no such image, so callers fail before heavy work.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"image directory {d} does not exist")
    indices = sorted(int(m.group(1)) for p in d.iterdir() if (m := _NAME.match(p.name)))
    if not indices:
        raise ValueError(f"image directory {d} holds no '<index>.png' images")
    return indices


def load_image(path: str | Path) -> Tensor:
    """One image as float32 (3, H, W) in [0, 1]; RGBA/greyscale are converted to RGB."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def load_images(directory: str | Path, indices: Sequence[int]) -> Tensor:
    """Images ``<directory>/<i>.png`` for i in `indices`, stacked to (N, 3, H, W); all must share one size."""
    imgs = [load_image(Path(directory) / f"{i}.png") for i in indices]
    sizes = {tuple(im.shape) for im in imgs}
    if len(sizes) > 1:
        raise ValueError(f"images in {directory} differ in size ({sorted(sizes)}); cannot stack them")
    return torch.stack(imgs)


def iter_same_size_batches(
    directory: str | Path, indices: Sequence[int], batch_size: int
) -> Iterator[tuple[list[int], Tensor]]:
    """Yield ``(indices, images)`` chunks of at most `batch_size`, split further where the image size changes.

    Reference sets may mix sizes; feature extractors resize internally, so only stacking needs equal sizes.
    """
    chunk: list[int] = []
    imgs: list[Tensor] = []
    for i in indices:
        im = load_image(Path(directory) / f"{i}.png")
        if imgs and (len(imgs) == batch_size or im.shape != imgs[0].shape):
            yield chunk, torch.stack(imgs)
            chunk, imgs = [], []
        chunk.append(i)
        imgs.append(im)
    if imgs:
        yield chunk, torch.stack(imgs)
