"""Feature extractors for FID/KID and a per-directory feature cache.

Every extractor has ``.name`` (used in cache file names) and
``__call__(images: (N, 3, H, W) float in [0, 1]) -> (N, D)`` returning CPU tensors, batched on its
device. Ours also carry ``.fingerprint``, which changes when their weights change, so a feature cache
never outlives the model that made it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qdrift.cache import file_sha256, tensors_sha256
from qdrift.eval.clip_score import clip_preprocess
from qdrift.eval.images import image_indices, iter_same_size_batches
from qdrift.eval.weights import require_weights_file
from qdrift.progress import progress

# The Inception-v3 FID weights (converted from the 2015-12-05 TensorFlow graph) that torch-fidelity
# downloads. pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` carries the same hash suffix and both
# projects use torchvision's module names, so it is probably the same tensors (not verified offline).
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
INCEPTION_ALT_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)


def inception_weights(path: str | os.PathLike | None) -> Path:
    """`path` if it is a file, else FileNotFoundError saying where to get it (eval.inception_weights)."""
    return require_weights_file(
        path,
        f"The FID Inception-v3 weights file ({INCEPTION_FILE})",
        f"{INCEPTION_URL} (or pytorch-fid's {INCEPTION_ALT_URL})",
        "eval.inception_weights",
    )


class FeatureExtractor(Protocol):
    """Images (N, 3, H, W) in [0, 1] -> features (N, D). An optional ``fingerprint`` str joins the cache key."""

    name: str

    def __call__(self, images: Tensor) -> Tensor: ...


def module_fingerprint(module: nn.Module) -> str:
    """Short hash of a module's parameter names, shapes and sums: cheap, and changes when weights change."""
    h = hashlib.sha1()
    for key, t in module.state_dict().items():
        h.update(f"{key}{tuple(t.shape)}{float(t.double().sum()) if t.is_floating_point() else int(t.sum())}".encode())
    return h.hexdigest()[:16]


def _batched(fn, images: Tensor, batch_size: int, desc: str) -> Tensor:
    """Run `fn` over `images` in batches (a terminal bar only when there is more than one batch: it runs
    inside `feature_cache`'s bar)."""
    starts = range(0, images.shape[0], batch_size)
    with torch.no_grad():
        out = [fn(images[s : s + batch_size]).cpu()
               for s in progress(starts, desc=desc, unit="batch", nested=True, disable=len(starts) <= 1)]
    return torch.cat(out)


class InceptionFeatures:
    """Inception-v3 pool3 (2048-d) FID features through torch-fidelity's TF-compatible extractor.

    torch-fidelity's `FeatureExtractorInceptionV3` takes uint8 images of any size and resizes them to
    299x299 itself with TensorFlow-1 bilinear interpolation, like the reference FID code; we only
    quantise [0, 1] floats to uint8 (rounding, so PNG values survive exactly). Its constructor loads
    the weights from `feature_extractor_weights_path` when given, so it never downloads here. It
    unpickles that file with ``weights_only=False``: point it only at a file you trust.
    """

    def __init__(
        self, weights_path: str | os.PathLike | None, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights(weights_path)
        try:
            self.model = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
        except RuntimeError as e:  # wrong file: state-dict key or shape mismatch
            raise RuntimeError(f"{path} is not an Inception-v3 FID state dict ({INCEPTION_FILE}): {e}") from e
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = batch_size
        self.name = "inception2048"
        self.fingerprint = module_fingerprint(self.model)

    def _features(self, images: Tensor) -> Tensor:
        u8 = images.to(self.device).mul(255).round_().clamp_(0, 255).to(torch.uint8)
        return self.model(u8)[0]

    def __call__(self, images: Tensor) -> Tensor:
        return _batched(self._features, images, self.batch_size, "inception features")


class ClipImageFeatures:
    """L2-normalised image embeddings of an open_clip-style model (anything with ``encode_image``).

    Used for the bench's small CLIP; when fed to FID/KID the numbers are "FID in CLIP feature space",
    not Inception FID, and must be labelled so.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess_size: int | tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        name: str = "clip",
    ):
        self.model = model.eval().to(device)
        self.size, self.mean, self.std = preprocess_size, mean, std
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = name
        self.fingerprint = module_fingerprint(model) + json.dumps([preprocess_size, list(mean), list(std)])

    def _features(self, images: Tensor) -> Tensor:
        x = clip_preprocess(images.to(self.device), self.size, self.mean, self.std)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def __call__(self, images: Tensor) -> Tensor:
        return _batched(self._features, images, self.batch_size, f"{self.name} features")


class PixelFeatures:
    """Area-downsampled pixels, flattened (3 * size^2 dims). Only for fast tests and the tiny smoke
    pipeline: it measures pixel statistics, not perceptual quality."""

    def __init__(self, size: int = 16):
        self.size = size
        self.name = f"pixel{size}"
        self.fingerprint = self.name

    def __call__(self, images: Tensor) -> Tensor:
        return F.interpolate(images.float(), size=(self.size, self.size), mode="area").flatten(1)


def _listing_key(directory: Path, indices: list[int], extractor: FeatureExtractor) -> str:
    """Hash of the image files' contents plus the extractor's identity (a copy of the same images
    has the same key; an edited image, even with its old size and time, does not)."""
    h = hashlib.sha256(f"{extractor.name}|{getattr(extractor, 'fingerprint', '')}".encode())
    for i in indices:
        h.update(f"|{i}:{file_sha256(directory / f'{i}.png')}".encode())
    return h.hexdigest()


def _cached_features(path: Path, key: str) -> Tensor | None:
    """The features stored at `path` if they were made for `key` and their bytes match the checksum
    written with them; None otherwise (then they are recomputed and overwritten)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        feats = load_file(str(path))["features"]
    except (OSError, SafetensorError, KeyError):
        return None
    if meta.get("sha256") != tensors_sha256([("features", feats)]):
        warnings.warn(f"feature cache {path} does not match its checksum (altered); recomputing it")
        return None
    return feats


def feature_cache(directory: str | Path, extractor: FeatureExtractor, batch_size: int = 64) -> Tensor:
    """Features of all ``<index>.png`` in `directory`, rows in ascending index order, computed once.

    Stored as ``<directory>/features-<extractor.name>.safetensors`` with a key over the images'
    contents and the extractor's fingerprint, and a checksum of the features; any change recomputes. Written to a temp
    file and moved into place, so a crash never leaves a truncated cache. Images are streamed in
    batches, so large sets never sit in memory at once.
    """
    d = Path(directory)
    indices = image_indices(d)
    key = _listing_key(d, indices, extractor)
    path = d / f"features-{extractor.name}.safetensors"
    cached = _cached_features(path, key) if path.is_file() else None
    if cached is not None:
        return cached
    chunks = [
        extractor(images)
        for _, images in progress(
            iter_same_size_batches(d, indices, batch_size),
            total=-(-len(indices) // batch_size),
            desc=f"{extractor.name} features of {d.name}",
            unit="batch",
            nested=False,
            disable=len(indices) <= batch_size,
        )
    ]
    feats = torch.cat(chunks).contiguous()
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({"features": feats, "indices": torch.tensor(indices)}, tmp,
                  metadata={"key": key, "sha256": tensors_sha256([("features", feats)])})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return feats
