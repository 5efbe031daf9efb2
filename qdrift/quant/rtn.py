"""Round-to-nearest with min-max ranges: RTN baseline, and MixDQ's final layers.

Weights: per-output-channel symmetric, scale = max|W_o| / (2^(b-1) - 1).
Activations: per-tensor asymmetric, static range = min/max observed over the calibration run.
"""
from __future__ import annotations

import logging

from torch import nn

from qdrift.progress import progress as progress_bar

from .layers import FakeQuantLayer, replace_module
from .observers import InputObserver, observing
from .primitives import quantize_weight
from .report import LayerRecord, layer_line
from .select import LayerSite
from .spec import QuantSpec

log = logging.getLogger(__name__)

# Part of the quantized state's cache key: bump when a change alters the quantized state (here or in
# the primitives, layers and helpers this pass calls).
# 2: a constant divides as a product with its float32 reciprocal on every device (primitives.div_const).
ALGORITHM_VERSION = 2


def observe_ranges(model: nn.Module, sites: list[LayerSite], calibrate, n_prompts: int,
                   bos_aware: bool = False) -> dict[str, InputObserver]:
    """One calibration run recording every listed layer's input range (BOS token excluded if asked)."""
    observers = {s.name: InputObserver(skip_first_token=bos_aware and s.tokens_first) for s in sites}
    with observing(model, observers):
        calibrate(n_prompts)
    return observers


def minmax_layer(orig: nn.Module, site: LayerSite, spec: QuantSpec, w_bits: int, a_bits: int,
                 obs: InputObserver | None, bos_fp: bool = False) -> FakeQuantLayer:
    """A layer with w_bits per-channel weights and a_bits static per-tensor activations (16 = keep)."""
    qw = quantize_weight(orig.weight, spec.weights.with_bits(w_bits)) if w_bits < 16 else None
    quant_acts = a_bits < 16 and site.role == "quant" and obs is not None and obs.calls > 0
    return FakeQuantLayer(
        orig, site.kind, qw, spec.acts.with_bits(a_bits) if quant_acts else None,
        act_range=obs.range() if quant_acts else None, bos_fp=bos_fp,
    )


def fill_record(rec: LayerRecord, layer: FakeQuantLayer) -> None:
    rec.w_bits = layer.qweight.spec.bits if layer.qweight is not None else 16
    rec.a_bits = layer.act_spec.bits if layer.act_spec is not None else 16
    rec.w_fmt, rec.w_granularity = "int", "channel"
    rec.bos_fp = layer.bos_fp


def run_rtn(model: nn.Module, sites: list[LayerSite], spec: QuantSpec, calibrate, records: dict[str, LayerRecord],
            progress: bool) -> None:
    targets = [s for s in sites if s.role != "fp16"]
    observers = observe_ranges(model, [s for s in targets if s.role == "quant"], calibrate, spec.calib_prompts)
    for s in progress_bar(targets, desc=f"{spec.name}: quantizing", nested=True, disable=not progress):
        layer = minmax_layer(model.get_submodule(s.name), s, spec, spec.weights.bits, spec.acts.bits,
                             observers.get(s.name))
        replace_module(model, s.name, layer)
        fill_record(records[s.name], layer)
        log.info(layer_line(records[s.name]))
