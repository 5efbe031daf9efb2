"""Loading a model's diffusers pipeline: from the hub (or a local snapshot), the bench weights, or in code
(tiny test pipelines; the real architectures with random weights, random_arch.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import diffusers
import torch

from .families import get_family
from .tiny import build_tiny

log = logging.getLogger(__name__)
SOURCES = ("hub", "bench", "tiny", "random")
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
    elif source == "random":
        from .random_arch import build_random

        pipe = build_random(model_cfg, family, device, dtype)   # built in place: the moves below are no-ops
    else:
        raise ValueError(f"unknown model source {source!r}; choose one of {SOURCES}")
    pipe = pipe.to(device)
    if pipe.dtype != dtype:  # hub and random weights already are in `dtype`; tiny/bench ones are float32
        pipe = pipe.to(dtype=dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # in-code modules start in training mode: dropout would make sampling random
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_available(model_cfg) -> None:
    """Raise ModelUnavailable now, without network, where `load_pipeline` would not find the weights."""
    if model_cfg.source == "bench":
        from qdrift.bench import WEIGHTS_DIR, weights_available
        from qdrift.bench.configs import GENERATORS

        if model_cfg.name not in GENERATORS:
            raise ModelUnavailable(f"model.source=bench has no model {model_cfg.name!r}; bench models: {GENERATORS}")
        if not weights_available():
            raise ModelUnavailable(f"the bench weights in {WEIGHTS_DIR} are incomplete; reinstall qdrift or "
                                   "regenerate them (experiments/train_bench.py, README bench section)")
    if model_cfg.source == "random":
        from .random_arch import check_arch

        try:
            check_arch(model_cfg, get_family(model_cfg.family))
        except ValueError as err:
            raise ModelUnavailable(f"{model_cfg.name} (model.source=random): {err}") from None
    if model_cfg.source != "hub":
        return
    local = model_cfg.get("local_path")
    if local:
        if not (Path(local) / "model_index.json").is_file():
            raise ModelUnavailable(f"model.local_path={local} is not a diffusers snapshot (no model_index.json). "
                                   + download_hint(model_cfg))
        return
    if model_cfg.get("allow_download", False):
        return   # from_pretrained may fetch it; nothing to check offline
    from huggingface_hub import try_to_load_from_cache

    revision = model_cfg.get("revision", "main")
    if not isinstance(try_to_load_from_cache(model_cfg.hub_id, "model_index.json", revision=revision), str):
        raise ModelUnavailable(f"{model_cfg.name}: {model_cfg.hub_id} (revision {revision}) is not in the Hugging Face "
                               "cache and model.allow_download=false. " + download_hint(model_cfg))


def download_hint(model_cfg) -> str:
    """How to get the weights onto a machine without network (`hf` is huggingface_hub's command line)."""
    name, repo = model_cfg.name, model_cfg.hub_id
    return (f"Download the weights on a machine with network access: `hf download {repo} --revision "
            f"{model_cfg.get('revision', 'main')} --local-dir /path/to/{name}` (gated models need `hf auth login` "
            f"first), then run with model.local_path=/path/to/{name}, or set model.allow_download=true where the "
            "hub is reachable.")


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
        raise ModelUnavailable(f"{model_cfg.name}: weights for {model_cfg.hub_id} are not available offline "
                               f"({type(err).__name__}). " + download_hint(model_cfg)) from err
