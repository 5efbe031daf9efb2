"""Save / load the quantized state (safetensors + JSON metadata in the file header).

The file holds what the passes computed, not the dequantized weights: per layer the packed
codes (two 4-bit codes per byte up to 4 bits), scales, smoothing factors, low-rank factors and
static activation ranges, plus a digest of the FP weights the layer was quantized from. Loading
checks those digests, then rebuilds the same `FakeQuantLayer`s on a fresh FP denoiser with the
same dequantization code, so outputs are bit-identical and no calibration runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from qdrift.cache import tensors_sha256

from .api import QuantInfo
from .layers import FakeQuantLayer, fake_quant_layers, replace_module
from .primitives import E2M1_GRID, QuantizedWeight, int_range
from .report import QuantReport
from .select import select_layers
from .spec import QuantizerSpec, QuantSpec

FORMAT_VERSION = 2   # 2: per-layer weight digests
_E2M1_X2 = torch.tensor([int(2 * v) for v in E2M1_GRID])   # codes store 2x the E2M1 value (a CPU constant)


class QuantStateMismatch(ValueError):
    """A saved state does not belong to the denoiser it is loaded into (other layers, shapes or weights)."""


# ------------------------------------------------------------------------------------------ packing
def _to_nibbles(codes: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Codes -> unsigned 4-bit values: int levels offset by -qmin; E2M1 as sign bit + grid index."""
    if spec.fmt == "nvfp4":
        grid = _E2M1_X2.to(codes.device)
        idx = (codes.abs().to(torch.int64).unsqueeze(-1) == grid).to(torch.uint8).argmax(-1).to(torch.uint8)
        return idx + 8 * (codes < 0).to(torch.uint8)
    return (codes.to(torch.int16) - int_range(spec.bits, True)[0]).to(torch.uint8)


def _from_nibbles(u: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    if spec.fmt == "nvfp4":
        mag = _E2M1_X2.to(u.device)[(u & 7).to(torch.int64)]
        return torch.where(u >= 8, -mag, mag).to(torch.int8)
    return (u.to(torch.int16) + int_range(spec.bits, True)[0]).to(torch.int8)


def pack_codes(codes: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Two 4-bit codes per byte (up to 4 bits and an even count), else the int8 codes; on the CPU."""
    flat = codes.detach().cpu().reshape(-1)
    if spec.bits > 4 or flat.numel() % 2:
        return flat.reshape(codes.shape)
    u = _to_nibbles(flat, spec)
    return u[0::2] | (u[1::2] << 4)


def unpack_codes(data: torch.Tensor, spec: QuantizerSpec, shape: Sequence[int]) -> torch.Tensor:
    if data.dtype == torch.int8:
        return data.reshape(shape)
    u = torch.stack([data & 15, data >> 4], dim=-1).reshape(-1)
    return _from_nibbles(u, spec).reshape(shape)


def weight_digest(layer: nn.Module) -> str:
    """sha256 (32 hex digits) of a layer's weight and bias as loaded: dtype, shape and bytes, on the CPU."""
    return tensors_sha256((slot, t) for slot in ("weight", "bias")
                          if (t := getattr(layer, slot, None)) is not None)[:32]


# ------------------------------------------------------------------------------------------ save / load
def save_quant_state(denoiser: nn.Module, path: str | Path) -> Path:
    """Write the fake-quant state of a denoiser quantized by `quantize` (or loaded)."""
    info: QuantInfo | None = getattr(denoiser, "_qdrift_quant", None)
    if info is None:
        raise RuntimeError("the denoiser carries no quantization state (run quantize() first)")
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, m in fake_quant_layers(denoiser):
        meta = dict(kind=m.kind, weight_shape=list(m.orig.weight.shape), digest=weight_digest(m.orig),
                    act_shift=m.act_shift, bos_fp=m.bos_fp, act=asdict(m.act_spec) if m.act_spec is not None else None,
                    w=None)
        q = m.qweight
        if q is not None:
            meta.update(w=asdict(q.spec), codes_shape=list(q.codes.shape), q_shape=list(q.shape))
            tensors[f"{name}.codes"] = pack_codes(q.codes, q.spec).contiguous().cpu()
            tensors[f"{name}.scale"] = q.scale.contiguous().cpu()
            if q.tensor_scale is not None:
                tensors[f"{name}.tensor_scale"] = q.tensor_scale.cpu()
        for buf in ("smooth", "lr_down", "lr_up", "act_lo", "act_hi"):
            t = getattr(m, buf)
            if t is not None:
                tensors[f"{name}.{buf}"] = t.detach().contiguous().cpu()
        layers[name] = meta
    header = dict(version=FORMAT_VERSION, spec=info.spec.to_dict(), fingerprint=info.spec.fingerprint(),
                  family=info.family, layers=layers, report=info.report.to_dict())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp file of its own per writer (two writers never share one), renamed over the target:
    # a crash never leaves a half-written cache entry.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"qdrift": json.dumps(header)})
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes it 0600; a cache is shared as other files are
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only swap it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_header(path: str | Path) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "qdrift" not in meta:
        raise ValueError(f"{path} is not a qdrift quantization state")
    return json.loads(meta["qdrift"])


@torch.no_grad()
def load_quant_state(denoiser: nn.Module, spec: QuantSpec, family: str, path: str | Path) -> QuantReport:
    """Rebuild the fake-quant twin saved at `path` on a fresh FP denoiser, without calibration."""
    header = read_header(path)
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: state format {header.get('version')}, expected {FORMAT_VERSION}")
    if header["fingerprint"] != spec.fingerprint():
        raise ValueError(f"{path} was made with quant config {header['spec']['name']!r} "
                         f"(fingerprint {header['fingerprint']}), not {spec.name!r} ({spec.fingerprint()})")
    if header["family"] != family:
        raise ValueError(f"{path} was made for model family {header['family']!r}, not {family!r}")
    if any(True for _ in fake_quant_layers(denoiser)):
        raise RuntimeError("the denoiser is already quantized; call dequantize() first")
    check_weights(denoiser, header, spec, family, path)

    new = {}
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        get = lambda k: f.get_tensor(k) if k in keys else None  # noqa: E731
        for name, meta in header["layers"].items():
            orig = denoiser.get_submodule(name)
            q = None
            if meta["w"] is not None:
                wspec = QuantizerSpec(**meta["w"])
                q = QuantizedWeight(unpack_codes(get(f"{name}.codes"), wspec, meta["codes_shape"]).to(orig.weight.device),
                                    get(f"{name}.scale").to(orig.weight.device),
                                    None if get(f"{name}.tensor_scale") is None
                                    else get(f"{name}.tensor_scale").to(orig.weight.device),
                                    wspec, tuple(meta["q_shape"]))
            lo, hi = get(f"{name}.act_lo"), get(f"{name}.act_hi")
            down, up = get(f"{name}.lr_down"), get(f"{name}.lr_up")
            new[name] = FakeQuantLayer(
                orig, meta["kind"], q, QuantizerSpec(**meta["act"]) if meta["act"] is not None else None,
                smooth=get(f"{name}.smooth"), lowrank=None if down is None else (down, up),
                act_shift=meta["act_shift"], act_range=None if lo is None else (lo, hi), bos_fp=meta["bos_fp"],
            )
    for name, layer in new.items():
        replace_module(denoiser, name, layer)
    report = QuantReport.from_dict(header["report"])
    denoiser._qdrift_quant = QuantInfo(spec, family, report)
    return report


def check_weights(denoiser: nn.Module, header: dict, spec: QuantSpec, family: str, path: str | Path) -> None:
    """Raise QuantStateMismatch unless every saved layer exists here with the very weights it was made from."""
    known = {s.name for s in select_layers(denoiser, family, spec.skip)}
    missing = sorted(set(header["layers"]) - known)
    if missing:
        raise QuantStateMismatch(
            f"{path}: layers not in this denoiser: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for name, meta in header["layers"].items():
        shape = list(denoiser.get_submodule(name).weight.shape)
        if shape != meta["weight_shape"]:
            raise QuantStateMismatch(f"{path}: {name} has weight shape {shape}, the file {meta['weight_shape']}")
    for name, meta in header["layers"].items():
        digest = weight_digest(denoiser.get_submodule(name))
        if digest != meta["digest"]:
            raise QuantStateMismatch(f"{path}: the weights of layer {name} are not those the state was made from "
                                     f"(digest {digest}, the file {meta['digest']})")


def quant_cache_key(spec: QuantSpec, model_id: str, prompts: Sequence[str]) -> str:
    """Cache key of a quantized state: model + every quant setting + the calibration prompts used."""
    n = max(spec.calib_prompts, spec.mixdq.sensitivity_prompts if spec.mixdq else 0)
    used = list(prompts)[:n]
    blob = json.dumps(dict(model=model_id, spec=spec.fingerprint(), prompts=used), sort_keys=True)
    return f"{spec.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
