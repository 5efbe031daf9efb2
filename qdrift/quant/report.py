"""What a quantization pass did: per-layer records and a model-level summary."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerRecord:
    name: str
    key: str
    kind: str                     # linear | pointwise | conv
    role: str                     # quant | weight_only | fp16
    params: int                   # weight elements
    out_features: int
    in_features: int              # reduction size (in * kh * kw for convs)
    w_bits: int = 16
    a_bits: int = 16
    w_fmt: str = "int"
    w_granularity: str = "group"
    w_group: int = 64
    alpha: float | None = None    # SVDQuant smoothing exponents
    beta: float | None = None
    rank: int = 0                 # low-rank branch
    lowrank_iters: int | None = None
    rel_error: float | None = None  # ||Y - Y_q||^2 / ||Y||^2 on the layer's calibration sample
    sensitivity: dict = field(default_factory=dict)  # MixDQ: {"w4": err, "a8": err, ...}
    bos_fp: bool = False
    has_bias: bool = False
    note: str = ""

    def packed_bytes(self) -> float:
        """Storage if packed: b-bit codes + scales, 16-bit low-rank/smoothing/bias; 16-bit if kept FP."""
        bias = 2 * self.out_features if self.has_bias else 0
        if self.w_bits >= 16:
            return 2 * self.params + bias
        codes = self.params * self.w_bits / 8
        if self.w_fmt == "nvfp4":
            scales = self.params / 16 + 4                        # one E4M3 per 16 + FP32 tensor scale
        elif self.w_granularity == "channel":
            scales = 2 * self.out_features
        else:
            scales = 2 * self.params / min(self.w_group, self.in_features)
        lowrank = 2 * self.rank * (self.in_features + self.out_features)
        smooth = 2 * self.in_features if self.alpha is not None else 0
        return codes + scales + lowrank + smooth + bias


@dataclass
class QuantReport:
    name: str
    method: str
    family: str
    layers: list[LayerRecord] = field(default_factory=list)
    other_params: int = 0         # parameters outside Linear/Conv2d (norms, tables), counted at 16 bit

    @property
    def quantized(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.w_bits < 16]

    @property
    def avg_w_bits(self) -> float:
        """Parameter-weighted weight bits over the quantized layers."""
        q = self.quantized
        n = sum(r.params for r in q)
        return sum(r.w_bits * r.params for r in q) / n if n else 16.0

    @property
    def avg_a_bits(self) -> float:
        """Mean activation bits over the layers with quantized weights and activations (16 if kept)."""
        q = [r for r in self.layers if r.role == "quant"]
        return sum(r.a_bits for r in q) / len(q) if q else 16.0

    @property
    def num_fp16(self) -> int:
        return sum(r.w_bits >= 16 for r in self.layers)

    @property
    def num_fp16_acts(self) -> int:
        return sum(r.role == "quant" and r.a_bits >= 16 for r in self.layers)

    @property
    def packed_mb(self) -> float:
        return (sum(r.packed_bytes() for r in self.layers) + 2 * self.other_params) / 2**20

    @property
    def fp16_mb(self) -> float:
        total = sum(r.params + (r.out_features if r.has_bias else 0) for r in self.layers) + self.other_params
        return 2 * total / 2**20

    def summary(self) -> str:
        lines = [
            f"{self.name} ({self.method}, family {self.family}): {len(self.quantized)}/{len(self.layers)} "
            f"Linear/Conv2d layers quantized, {self.num_fp16} kept 16-bit",
            f"  average bits: weights {self.avg_w_bits:.2f}, activations {self.avg_a_bits:.2f}"
            + (f" ({self.num_fp16_acts} activation layers kept 16-bit)" if self.num_fp16_acts else ""),
            f"  model size if packed: {self.packed_mb:.1f} MB (16-bit: {self.fp16_mb:.1f} MB, "
            f"x{self.fp16_mb / max(self.packed_mb, 1e-9):.2f} smaller)",
        ]
        errs = [r.rel_error for r in self.layers if r.rel_error is not None]
        if errs:
            lines.append(f"  layer output error (relative, calibration sample): mean {sum(errs) / len(errs):.2e}, "
                         f"max {max(errs):.2e}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantReport":
        d = dict(d)
        d["layers"] = [LayerRecord(**r) for r in d.get("layers", [])]
        return cls(**d)


def layer_line(r: LayerRecord) -> str:
    """One log line per layer: what was chosen for it."""
    parts = [f"{r.name} [{r.key}]", f"W{r.w_bits}A{r.a_bits}" if r.w_bits < 16 else "16-bit"]
    if r.alpha is not None:
        parts.append(f"alpha={r.alpha:.2f} beta={r.beta:.2f}")
    if r.rank:
        parts.append(f"rank={r.rank} iters={r.lowrank_iters}")
    if r.rel_error is not None:
        parts.append(f"err={r.rel_error:.2e}")
    if r.bos_fp:
        parts.append("BOS fp")
    if r.note:
        parts.append(r.note)
    return " ".join(parts)
