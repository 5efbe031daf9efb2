"""Quantizer settings as frozen dataclasses (deepcompressor style).

`QuantSpec.from_config` reads one `conf/quant/<option>.yaml` node. The YAML is flat (easy
Hydra overrides such as `quant.calib_prompts=4`); here it becomes a small tree: a tensor
quantizer for weights and one for activations, the calibration settings, and the
method-specific block (SVDQuant or MixDQ). Fields a method does not use are an error, so a
typo or a mixed-up option never silently changes nothing.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

METHODS = ("none", "rtn", "svdquant", "mixdq")
FORMATS = ("int", "nvfp4")
GRANULARITIES = ("group", "channel", "tensor")
INT_BITS = range(2, 9)   # simulated integer widths we support
NVFP4_GROUP = 16         # NVFP4: E2M1 values share one FP8 E4M3 scale per 16 elements


@dataclass(frozen=True)
class QuantizerSpec:
    """How one tensor (a layer's weight or its input activation) is fake-quantized.

    granularity: "group"   -- `group_size` consecutive input channels share a scale
                             (weights: per output row; activations: per token);
                 "channel" -- one scale per output channel (weights only);
                 "tensor"  -- one scale for the whole tensor (activations only).
    dynamic: activation scales computed on the fly per call (True) or calibrated once from
             the observed min/max (False; then asymmetric with a zero point if not symmetric).
    """

    bits: int
    fmt: str = "int"
    granularity: str = "group"
    group_size: int = 64
    symmetric: bool = True
    dynamic: bool = True

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown number format {self.fmt!r}; known: {FORMATS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; known: {GRANULARITIES}")
        if self.fmt == "nvfp4":
            if self.bits != 4 or self.granularity != "group" or self.group_size != NVFP4_GROUP:
                raise ValueError("nvfp4 means 4-bit E2M1 values in groups of 16 with E4M3 scales")
        elif self.bits not in INT_BITS:
            raise ValueError(f"{self.bits}-bit integers are not supported; choose from {list(INT_BITS)}")
        if self.granularity == "group" and self.group_size < 1:
            raise ValueError("group_size must be positive")

    def with_bits(self, bits: int) -> "QuantizerSpec":
        return QuantizerSpec(bits, self.fmt, self.granularity, self.group_size, self.symmetric, self.dynamic)


@dataclass(frozen=True)
class SVDQuantSpec:
    rank: int = 32               # 16-bit low-rank branch absorbing the outliers moved into W by smoothing
    alpha_grid: int = 20         # alpha in {k / alpha_grid}; beta in {0, 1 - alpha}
    lowrank_iters: int = 100     # refinement iterations of the branch against the quantized residual (early-stopped)
    calib_tokens: int = 4096     # per-layer random subsample of calibration inputs for the searches

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha_grid < 1 or self.lowrank_iters < 0 or self.calib_tokens < 1:
            raise ValueError(f"invalid SVDQuant settings: {self}")


@dataclass(frozen=True)
class MixDQSpec:
    w_options: tuple[int, ...] = (2, 4, 8)   # candidate weight bits per layer
    a_options: tuple[int, ...] = (4, 8)      # candidate activation bits per layer
    keep_fp_acts: int = 3                    # most sensitive activation layers kept in 16 bit
    sensitivity_prompts: int = 8             # prompts per sensitivity run (one per layer and option); <= calib_prompts
    bos_aware: bool = True                   # cross-attention K/V of the first text token in full precision

    def __post_init__(self) -> None:
        for opts in (self.w_options, self.a_options):
            if not opts or any(b not in INT_BITS for b in opts):
                raise ValueError(f"MixDQ bit options must be integers in {list(INT_BITS)}, got {opts}")
        if self.keep_fp_acts < 0 or self.sensitivity_prompts < 1:
            raise ValueError(f"invalid MixDQ settings: {self}")


@dataclass(frozen=True)
class QuantSpec:
    """One PTQ configuration: what `quantize` does to a denoiser."""

    name: str
    method: str
    weights: QuantizerSpec | None = None     # for MixDQ: bits = the average-bit budget
    acts: QuantizerSpec | None = None
    calib_prompts: int = 0                   # calibration prompts run along the model's own trajectory
    seed: int = 0                            # token subsampling, randomized SVD; PTQ calibration prompts and noise
    skip: tuple[str, ...] = ()               # extra semantic keys kept in 16 bit (see quant.select.KEYS)
    svdquant: SVDQuantSpec | None = None
    mixdq: MixDQSpec | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; known: {METHODS}")
        if self.method != "none" and (self.weights is None or self.acts is None):
            raise ValueError(f"method {self.method!r} needs weight and activation quantizers")
        if self.method != "none" and self.calib_prompts < 1:
            raise ValueError("calib_prompts must be >= 1")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: Any) -> "QuantSpec":
        """Build from a conf/quant node (OmegaConf DictConfig or plain mapping)."""
        d = _to_dict(cfg)
        if "name" not in d or "method" not in d:
            raise ValueError("a quant config needs `name` and `method`")
        method = d["method"]
        if method not in METHODS:
            raise ValueError(f"unknown quantization method {method!r}; known: {METHODS}")
        allowed = set(_COMMON) | set(_METHOD_FIELDS.get(method, ()))
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"quant config {d['name']!r}: fields {sorted(unknown)} are not used by method {method!r}")
        if method == "none":
            return cls(name=d["name"], method="none")
        return _BUILDERS[method](d)

    # ---------------------------------------------------------------- identity
    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Stable hash of every setting that changes the quantized model."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_COMMON = ("name", "method", "w_bits", "a_bits", "format", "group_size", "calib_prompts", "seed", "skip")
_METHOD_FIELDS = {
    "svdquant": ("rank", "alpha_grid", "lowrank_iters", "calib_tokens"),
    "mixdq": ("w_options", "a_options", "keep_fp_acts", "sensitivity_prompts", "bos_aware"),
    "rtn": (),
}


def _to_dict(cfg: Any) -> dict:
    if isinstance(cfg, Mapping):
        return dict(cfg)
    try:  # OmegaConf node
        from omegaconf import OmegaConf

        return dict(OmegaConf.to_container(cfg, resolve=True))
    except Exception as e:  # noqa: BLE001 - report what we were given
        raise TypeError(f"cannot read a quant config from {type(cfg).__name__}") from e


def _common(d: dict, default_prompts: int) -> dict:
    return dict(
        name=d["name"], method=d["method"], calib_prompts=int(d.get("calib_prompts", default_prompts)),
        seed=int(d.get("seed", 0)), skip=tuple(d.get("skip", ()) or ()),
    )


def _svdquant(d: dict) -> QuantSpec:
    fmt = d.get("format", "int")
    if fmt == "nvfp4":
        if d.get("w_bits", 4) != 4 or d.get("a_bits", 4) != 4:
            raise ValueError("nvfp4 is W4A4 by definition")
        w = QuantizerSpec(4, "nvfp4", "group", NVFP4_GROUP)
        a = QuantizerSpec(4, "nvfp4", "group", NVFP4_GROUP)
    elif fmt == "int":
        g = int(d.get("group_size", 64))
        w = QuantizerSpec(int(d["w_bits"]), "int", "group", g)
        a = QuantizerSpec(int(d["a_bits"]), "int", "group", g)
    else:
        raise ValueError(f"unknown number format {fmt!r}; known: {FORMATS}")
    svd = SVDQuantSpec(**{k: int(d[k]) for k in _METHOD_FIELDS["svdquant"] if k in d})
    return QuantSpec(weights=w, acts=a, svdquant=svd, **_common(d, 128))


def _per_channel_weights_per_tensor_acts(d: dict) -> tuple[QuantizerSpec, QuantizerSpec]:
    if d.get("format", "int") != "int":
        raise ValueError(f"method {d['method']!r} supports only the int format")
    w = QuantizerSpec(int(d["w_bits"]), "int", "channel", symmetric=True)
    a = QuantizerSpec(int(d["a_bits"]), "int", "tensor", symmetric=False, dynamic=False)
    return w, a


def _mixdq(d: dict) -> QuantSpec:
    w, a = _per_channel_weights_per_tensor_acts(d)
    kw = {k: d[k] for k in _METHOD_FIELDS["mixdq"] if k in d}
    for k in ("w_options", "a_options"):
        if k in kw:
            kw[k] = tuple(int(b) for b in kw[k])
    mix = MixDQSpec(**kw)
    if w.bits < min(mix.w_options) or a.bits < min(mix.a_options):
        raise ValueError(f"{d['name']}: the bit budget is below every candidate bit width")
    return QuantSpec(weights=w, acts=a, mixdq=mix, **_common(d, 32))


def _rtn(d: dict) -> QuantSpec:
    w, a = _per_channel_weights_per_tensor_acts(d)
    return QuantSpec(weights=w, acts=a, **_common(d, 32))


_BUILDERS = {"svdquant": _svdquant, "mixdq": _mixdq, "rtn": _rtn}
