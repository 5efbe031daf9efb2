"""The paper's real architectures with random weights, built from their published configs (no download).

`archs/<arch>.json` holds, per pipeline component, the class and the constructor config of the real
checkpoint with the hub file it came from; `variants` patch it for a sibling checkpoint (SDXL-Turbo is
SDXL with its own scheduler) and `reduced` shrinks widths and depths while keeping every class and the
block structure (CPU tests). Weights come from the libraries' own initialisers under `model.seed`;
tokenizers are the local word-level ones (tokenizers.py), so prompts outside their small vocabulary
read as <unk>. The point is speed, memory and the code path at the paper's size, not image quality.
"""
from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import diffusers
import torch
import transformers

from .tokenizers import word_level_tokenizer

ARCH_DIR = Path(__file__).with_name("archs")
ARCH_SIZES = ("full", "reduced")


def arch_names() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


def arch_path(name: str) -> Path:
    if name not in arch_names():
        raise ValueError(f"model.arch={name!r} is not a shipped architecture; choose one of {arch_names()} "
                         f"(files in {ARCH_DIR})")
    return ARCH_DIR / f"{name}.json"


def load_arch(name: str, size: str = "full", variant: str | None = None) -> dict:
    """The architecture `name` as {pipeline, hub_id, components}, with `variant` and then `size` applied."""
    if size not in ARCH_SIZES:
        raise ValueError(f"model.arch_size={size!r} is not an option; choose one of {list(ARCH_SIZES)}")
    arch = json.loads(arch_path(name).read_text())
    if variant is not None:
        variants = arch.get("variants", {})
        if variant not in variants:
            raise ValueError(f"architecture {name} has no variant {variant!r}; variants: {sorted(variants)}")
        arch = _patch(arch, variants[variant])
    return reduce_arch(arch) if size == "reduced" else arch


def reduce_arch(arch: dict) -> dict:
    """`arch` with its `reduced` config overrides applied: same classes and blocks, tiny widths."""
    return _patch(arch, {"components": {slot: {"config": over} for slot, over in arch.get("reduced", {}).items()}})


def _patch(arch: dict, patch: dict) -> dict:
    out = copy.deepcopy(arch)
    out["hub_id"] = patch.get("hub_id", out.get("hub_id"))
    for slot, over in patch.get("components", {}).items():
        if slot not in out["components"]:
            raise ValueError(f"architecture {out['name']}: a patch names an unknown component {slot!r}")
        spec = out["components"][slot]
        if "class" in over and over["class"] != spec["class"]:
            spec["config"] = {}   # another class: its config replaces the old one whole
        spec.update({k: v for k, v in over.items() if k != "config"})
        spec["config"] = {**spec.get("config", {}), **over.get("config", {})}
    return out


def check_arch(model_cfg, family) -> dict:
    """The architecture `model_cfg` asks for, refused (ValueError) where it cannot build `family`'s pipeline."""
    arch = load_arch(model_cfg.get("arch"), model_cfg.get("arch_size", "full"), model_cfg.get("arch_variant"))
    if arch["pipeline"] != family.pipeline_class:
        raise ValueError(f"model.arch={model_cfg.arch} builds a {arch['pipeline']}, but model.family={family.name} "
                         f"runs a {family.pipeline_class}")
    return arch


@cache
def vocabulary() -> tuple[str, ...]:
    """The tokenizers' words: the tiny models' and the bench captions' (the offline prompt sets)."""
    from qdrift.bench.grammar import vocabulary as bench_words

    from .tiny import TINY_WORDS

    return tuple(sorted(set(TINY_WORDS) | set(bench_words())))


def vocabulary_digest() -> str:
    return hashlib.sha256("\n".join(vocabulary()).encode()).hexdigest()


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_component(spec: dict, special_ids: dict | None = None):
    """One diffusers/transformers component from its spec, on the current default device and dtype.

    `special_ids` (pad/bos/eos) replace a text encoder's: its inputs come from the local tokenizer.
    """
    if spec["library"] == "diffusers":
        return getattr(diffusers, spec["class"])(**spec["config"])
    if spec["library"] == "transformers":
        cls = getattr(transformers, spec["class"])
        return cls(cls.config_class(**{**spec["config"], **(special_ids or {})}))
    raise ValueError(f"cannot build a {spec['library']} component {spec['class']!r}")


def build_random(model_cfg, family, device: torch.device, dtype: torch.dtype):
    """`model_cfg`'s pipeline with random weights, built directly on `device` in `dtype`."""
    arch = check_arch(model_cfg, family)
    specs = arch["components"]
    components, special_ids = {}, {}
    for slot, spec in specs.items():
        if spec["library"] == "local":
            components[slot] = tok = _tokenizer(spec, specs, model_cfg)
            special_ids[spec["encoder"]] = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
                                            "eos_token_id": tok.eos_token_id}
        elif spec["class"].endswith("Scheduler"):
            components[slot] = build_component(spec)   # on the host: its tables are float32 CPU tensors
    torch.manual_seed(int(model_cfg.get("seed", 0)))
    # Parameters are created where they live, in their dtype: a 12B model never exists in float32 on the host.
    with torch.device(device), default_dtype(dtype):
        for slot, spec in specs.items():
            if slot not in components:
                components[slot] = _as_loaded(build_component(spec, special_ids.get(slot)), spec, dtype).eval()
    pipe = getattr(diffusers, arch["pipeline"])(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _as_loaded(module: torch.nn.Module, spec: dict, dtype: torch.dtype) -> torch.nn.Module:
    """The dtypes from_pretrained(torch_dtype=dtype) leaves: diffusers casts the whole model (buffers made in
    float32 too), transformers builds under the default dtype; both keep their fp32 modules (T5's `wo`)
    in float32 when loading float16, transformers its strict ones in bfloat16 too."""
    if spec["library"] == "diffusers":
        torch.nn.Module.to(module, dtype)   # ModelMixin.to warns about fp32 modules even where it has none
    half = (torch.float16, torch.bfloat16)
    keep = set(module._keep_in_fp32_modules or ()) if dtype == torch.float16 else set()
    keep |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ()) if dtype in half else set()
    for name, sub in module.named_modules():
        if keep & set(name.split(".")):
            sub.to(torch.float32)
    return module


def _tokenizer(spec: dict, specs: dict, model_cfg):
    """A word-level tokenizer padding to the pipeline's length (CLIP: its 77 positions; T5/Gemma: the
    model's max_sequence_length), whose ids all index the encoder's embedding."""
    length = spec.get("max_length") or model_cfg.get("max_sequence_length")
    if not length:
        raise ValueError(f"{model_cfg.name}: the {spec['encoder']} tokenizer needs model.max_sequence_length")
    tok = word_level_tokenizer(list(vocabulary()), int(length))
    vocab = specs[spec["encoder"]]["config"]["vocab_size"]
    if len(tok) > vocab:
        raise ValueError(f"{model_cfg.name}: the local tokenizer has {len(tok)} tokens, more than "
                         f"{spec['encoder']}'s vocab_size {vocab}")
    return tok


def parameter_count(spec: dict) -> int:
    """Parameters of one component, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        module = build_component(spec)
    return sum(p.numel() for p in module.parameters())
