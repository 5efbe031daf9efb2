"""Which layers PTQ touches: semantic module keys plus per-family skip lists.

Every Linear/Conv2d of a diffusers denoiser gets one semantic key (deepcompressor style:
"attn_qkv", "cross_kv", "ffn_down", "resblock_conv", "embed", ...) from one table of module
path patterns; diffusers uses the same attribute names across PixArt, SANA, FLUX and the
SD/SDXL U-Net, so one table serves all. A family's rules then say which keys stay in 16 bit
and which are quantized weight-only. Methods never look at module names, only at keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

# Semantic key -> module path patterns (fnmatch on the dotted name). First match wins, so the
# specific patterns (the FLUX single block's proj_out, the top-level proj_out) come first.
KEY_PATTERNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("single_out", ("single_transformer_blocks.*.proj_out",)),
    ("ffn_up", ("single_transformer_blocks.*.proj_mlp", "*.ff.net.0.proj", "*.ff.conv_inverted")),
    ("final", ("proj_out", "norm_out.*", "conv_out", "proj_out_*")),
    ("embed", ("pos_embed.*", "patch_embed.*", "x_embedder", "context_embedder", "conv_in", "caption_projection.*")),
    ("time_embed", ("adaln_single.emb.*", "time_embed.emb.*", "time_text_embed.*", "time_embedding.*",
                    "add_embedding.*", "class_embedding.*")),
    ("adanorm", ("adaln_single.linear", "time_embed.linear", "*.norm1.linear", "*.norm1_context.linear",
                 "*.norm.linear")),
    ("transformer_proj", ("*.proj_in", "*.proj_out")),
    ("sampler", ("*.downsamplers.*", "*.upsamplers.*")),
    ("resblock_shortcut", ("*.resnets.*.conv_shortcut",)),
    ("resblock_time_proj", ("*.resnets.*.time_emb_proj",)),
    ("resblock_conv", ("*.resnets.*.conv1", "*.resnets.*.conv2")),
    ("cross_q", ("*.attn2.to_q",)),
    ("cross_kv", ("*.attn2.to_k", "*.attn2.to_v")),
    ("cross_out", ("*.attn2.to_out.0",)),
    ("attn_qkv", ("*.attn1.to_q", "*.attn1.to_k", "*.attn1.to_v", "*.attn.to_q", "*.attn.to_k", "*.attn.to_v")),
    ("attn_out", ("*.attn1.to_out.0", "*.attn.to_out.0")),
    ("attn_add_qkv", ("*.attn.add_q_proj", "*.attn.add_k_proj", "*.attn.add_v_proj")),
    ("attn_add_out", ("*.attn.to_add_out",)),
    ("ffn_down", ("*.ff.net.2", "*.ff.conv_point")),
    ("ffn_dw", ("*.ff.conv_depth",)),
    ("ffn_add_up", ("*.ff_context.net.0.proj",)),
    ("ffn_add_down", ("*.ff_context.net.2",)),
)
KEYS = tuple(k for k, _ in KEY_PATTERNS) + ("other",)

# Kept in 16 bit by every family: embeddings, patch/conv_in, time/text embedders, final norm and
# projection, U-Net proj_in/out and up/down samplers, resnet shortcut and time projections, and
# SANA's depthwise conv (not a GEMM). Unknown layers ("other") are never quantized.
_ALWAYS_FP = frozenset({"embed", "time_embed", "final", "transformer_proj", "sampler", "resblock_shortcut",
                        "resblock_time_proj", "ffn_dw", "other"})
# MixDQ's "content" group: layers that shape what is drawn (text paths and FFNs); the rest is "quality".
CONTENT_KEYS = frozenset({"cross_q", "cross_kv", "cross_out", "ffn_up", "ffn_down", "ffn_add_up", "ffn_add_down",
                          "attn_add_qkv", "attn_add_out"})
# Lower bounds of activation functions feeding a layer; SVDQuant shifts such inputs to >= 0 and
# quantizes them unsigned. Slightly beyond the true minima (GELU -0.170, SiLU -0.278).
ACT_LOWER_BOUNDS = {"GELU": -0.171875, "SiLU": -0.28125}


@dataclass(frozen=True)
class FamilyRules:
    family: str
    skip: frozenset[str]           # keys kept in 16 bit
    weight_only: frozenset[str]    # keys whose weights are quantized but activations stay 16 bit


FAMILY_RULES: dict[str, FamilyRules] = {
    r.family: r
    for r in (
        FamilyRules("pixart", _ALWAYS_FP | {"adanorm"}, frozenset()),
        FamilyRules("sana", _ALWAYS_FP | {"adanorm"}, frozenset()),
        FamilyRules("sd", _ALWAYS_FP | {"adanorm"}, frozenset()),
        FamilyRules("sdxl", _ALWAYS_FP | {"adanorm"}, frozenset()),
        # SVDQuant quantizes FLUX's adaLN modulation weights (4-bit, 16-bit activations).
        FamilyRules("flux", _ALWAYS_FP, frozenset({"adanorm"})),
    )
}


def rules_for(family: str) -> FamilyRules:
    if family not in FAMILY_RULES:
        raise ValueError(f"no quantization selection rules for model family {family!r}; known: {sorted(FAMILY_RULES)}")
    return FAMILY_RULES[family]


def key_of(name: str) -> str:
    for key, patterns in KEY_PATTERNS:
        if any(fnmatchcase(name, p) for p in patterns):
            return key
    return "other"


@dataclass(frozen=True)
class LayerSite:
    """One Linear/Conv2d of the denoiser and how PTQ treats it."""

    name: str
    key: str
    role: str                  # "quant" (weights + activations) | "weight_only" | "fp16"
    kind: str                  # "linear" | "pointwise" (1x1 conv, handled as a linear) | "conv"
    act_lower_bound: float | None  # input known to be >= this (post-GELU/SiLU), else None
    tokens_first: bool         # input is (B, L, C) text tokens: BOS-aware quantization applies

    @property
    def group(self) -> str:
        """MixDQ sensitivity group."""
        return "content" if self.key in CONTENT_KEYS else "quality"


def layer_kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.kernel_size == (1, 1) and m.stride == (1, 1) and m.padding in ((0, 0), "valid") and m.groups == 1:
        return "pointwise"
    return "conv"


def _act_lower_bound(model: nn.Module, name: str, key: str) -> float | None:
    """Lower bound of the activation function that feeds this layer, if it is a plain GELU/SiLU."""
    if key in ("ffn_down", "ffn_add_down") and name.endswith(".net.2"):
        act = model.get_submodule(name[: -len("2")] + "0")   # ff.net.0: GELU / GEGLU / ...
        return ACT_LOWER_BOUNDS.get(type(act).__name__)      # gated (GLU) products have no bound
    if key == "resblock_conv":
        act = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "nonlinearity", None)
        return ACT_LOWER_BOUNDS.get(type(act).__name__) if act is not None else None
    return None


def select_layers(model: nn.Module, family: str, extra_skip: tuple[str, ...] = ()) -> list[LayerSite]:
    """All Linear/Conv2d layers of `model` with their key and role, in module order."""
    rules = rules_for(family)
    unknown = set(extra_skip) - set(KEYS)
    if unknown:
        raise ValueError(f"unknown semantic keys in skip list: {sorted(unknown)}; known: {KEYS}")
    skip = rules.skip | set(extra_skip)
    sites = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        key = key_of(name)
        role = "fp16" if key in skip else "weight_only" if key in rules.weight_only else "quant"
        sites.append(LayerSite(
            name=name, key=key, role=role, kind=layer_kind(m),
            act_lower_bound=_act_lower_bound(model, name, key) if role == "quant" else None,
            tokens_first=key == "cross_kv",
        ))
    return sites
