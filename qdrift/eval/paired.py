"""Per-image metrics of a variant against the FP image with the same index (PSNR, SSIM, LPIPS).

They measure how far quantization (and its correction) moves each individual sample from what the
full-precision model draws from the same seed, which FID cannot show.
"""
from __future__ import annotations

import os
import pickle
import warnings

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from qdrift.eval.weights import require_weights_file

# Identical images have infinite PSNR. We cap every per-image value at PSNR_CAP_DB so means stay
# finite and JSON-safe; 100 dB is far above any real difference between 8-bit images that matters
# (one pixel off by 1/255 in a 64x64 image is already ~94 dB).
PSNR_CAP_DB = 100.0

# torchvision's ImageNet AlexNet, LPIPS's default backbone. torchmetrics ships the LPIPS linear heads
# but fetches this backbone from the internet, which is impossible here.
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_BACKBONE_URL = f"https://download.pytorch.org/models/{LPIPS_BACKBONE_FILE}"


def psnr(images: Tensor, fp_images: Tensor) -> Tensor:
    """Per-image PSNR in dB (N,), data range 1, capped at `PSNR_CAP_DB` (identical images give the cap)."""
    values = peak_signal_noise_ratio(
        images.double(), fp_images.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return values.clamp(max=PSNR_CAP_DB)


def ssim(images: Tensor, fp_images: Tensor) -> Tensor:
    """Per-image SSIM (N,) with the standard 11x11 Gaussian window (sigma 1.5), data range 1.

    Computed in float32 (float64 grouped convolutions are ~10x slower on CPU and dominated the
    evaluate stage; SSIM agrees to ~1e-6), returned as float64 like the other per-image metrics.
    """
    values = structural_similarity_index_measure(images.float(), fp_images.float(), data_range=1.0, reduction="none")
    return values.double()


def lpips_weights(weights_path: str | os.PathLike | None):
    """`weights_path` if it is a file, else FileNotFoundError saying what to download (eval.lpips_weights)."""
    what = f"LPIPS AlexNet backbone ({LPIPS_BACKBONE_FILE})"
    return require_weights_file(weights_path, what, LPIPS_BACKBONE_URL, "eval.lpips_weights")


def load_lpips(weights_path: str | os.PathLike | None, device: str | torch.device = "cpu") -> nn.Module | None:
    """LPIPS (AlexNet) with the backbone from a local torchvision `alexnet` state dict, or None.

    Without usable weights LPIPS is skipped with one warning (the key is ``eval.lpips_weights``):
    a randomly initialised backbone would give numbers that look real but are not.
    """
    try:
        path = lpips_weights(weights_path)
    except FileNotFoundError as e:
        warnings.warn(f"LPIPS skipped: {e}", stacklevel=2)
        return None
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    # pnet_rand=True builds the backbone without fetching it; the bundled linear heads still load.
    net = _NoTrainLpips(net="alex", pretrained=True, pnet_rand=True)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # torchmetrics splits torchvision's `features` Sequential into slices that keep its indices.
        for piece in (net.net.slice1, net.net.slice2, net.net.slice3, net.net.slice4, net.net.slice5):
            for idx, layer in piece.named_children():
                if list(layer.state_dict()):  # conv layers; ReLU/pooling have no weights
                    prefix = f"features.{idx}."
                    layer.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    except (RuntimeError, AttributeError, pickle.UnpicklingError) as e:
        msg = f"LPIPS skipped: {path} is not a torchvision alexnet state dict ({LPIPS_BACKBONE_URL}): {e}"
        warnings.warn(msg.replace("\n", " "), stacklevel=2)
        return None
    return net.eval().to(device)


@torch.no_grad()
def lpips(images: Tensor, fp_images: Tensor, net: nn.Module) -> Tensor:
    """Per-image LPIPS distance (N,) from a `load_lpips` network; lower is more similar."""
    dev = next(net.parameters()).device
    return net(images.float().to(dev), fp_images.float().to(dev), normalize=True).flatten().cpu().double()


def paired_metrics(images: Tensor, fp_images: Tensor, lpips_net: nn.Module | None = None) -> dict[str, Tensor]:
    """``{"psnr", "ssim"[, "lpips"]}`` per-image tensors (N,) for aligned image batches."""
    if images.shape != fp_images.shape:
        raise ValueError(f"paired images differ in shape: {tuple(images.shape)} vs {tuple(fp_images.shape)}")
    out = {"psnr": psnr(images, fp_images), "ssim": ssim(images, fp_images)}
    if lpips_net is not None:
        out["lpips"] = lpips(images, fp_images, lpips_net)
    return out
