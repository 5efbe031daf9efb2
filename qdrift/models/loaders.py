"""Loading a model's diffusers pipeline: from the hub (or a local snapshot), the bench weights, or in code."""
from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import torch

from .families import get_family
from .tiny import build_tiny

log = logging.getLogger(__name__)
SOURCES = ("hub", "bench", "tiny")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelUnavailable(RuntimeError):
    """The weights are not on this machine (and downloading is off or impossible)."""


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    # Half precision on CPU is slow or unsupported for many kernels: compute in float32 there.
    return torch.float32 if device.type == "cpu" else DTYPES[name]


def load_pipeline(model_cfg, device: torch.device):
    """The pipeline for `model_cfg` (conf/model/*.yaml) on `device`, progress bars off."""
    family = get_family(model_cfg.family)
    source = model_cfg.source
    dtype = resolve_dtype(model_cfg.get("dtype", "float32"), device)
    if source == "tiny":
        pipe = build_tiny(family.name)
    elif source == "bench":
        from qdrift.bench import load_bench_pipeline

        pipe = load_bench_pipeline(model_cfg.name, device="cpu", dtype=torch.float32)
    elif source == "hub":
        pipe = _from_hub(model_cfg, family.pipeline_class, dtype)
    else:
        raise ValueError(f"unknown model source {source!r}; choose one of {SOURCES}")
    pipe = pipe.to(device)
    if pipe.dtype != dtype:  # hub weights already load in `dtype`; tiny/bench ones are float32
        pipe = pipe.to(dtype=dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # in-code modules start in training mode: dropout would make sampling random
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _from_hub(model_cfg, class_name: str, dtype: torch.dtype):
    cls = getattr(diffusers, class_name)
    where = model_cfg.get("local_path") or model_cfg.hub_id
    allow = bool(model_cfg.get("allow_download", False))
    if model_cfg.get("local_path") and not Path(where).is_dir():
        raise ModelUnavailable(f"model.local_path={where} is not a directory")
    kwargs = dict(torch_dtype=dtype, local_files_only=not allow)
    if not model_cfg.get("local_path"):
        kwargs["revision"] = model_cfg.get("revision", "main")
    if model_cfg.get("variant"):
        kwargs["variant"] = model_cfg.variant
    try:
        return cls.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelUnavailable(
            f"{model_cfg.name}: weights for {model_cfg.hub_id} are not available offline ({type(err).__name__}). "
            f"Download them on a machine with network access: "
            f"`huggingface-cli download {model_cfg.hub_id} --revision {model_cfg.get('revision', 'main')} "
            f"--local-dir /path/to/{model_cfg.name}` (gated models need `huggingface-cli login` first), "
            f"then run with model.local_path=/path/to/{model_cfg.name}, or set model.allow_download=true "
            f"where the hub is reachable."
        ) from err
