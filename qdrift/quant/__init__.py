"""Post-training quantization of diffusers denoisers as simulated (fake) quantization.

Methods: SVDQuant (W4A4, W3A4, NVFP4), MixDQ (W4A8, W8A8) and an RTN baseline, each a pass that
replaces the selected Linear/Conv2d layers of a transformer/U-Net by `FakeQuantLayer` twins
that keep the original modules (for FP mode and undo).

    spec = QuantSpec.from_config(cfg.quant)
    report = quantize(denoiser, spec, family, calibrate)
    save_quant_state(denoiser, path); load_quant_state(fresh, spec, family, path)
    with quant_enabled(denoiser, False): ...     # original FP layers
    dequantize(denoiser)                         # undo
"""
from .api import QuantInfo, algorithm_version, is_implemented, quantize
from .layers import FakeQuantLayer, dequantize, fake_quant_layers, quant_enabled
from .report import LayerRecord, QuantReport
from .select import KEYS, LayerSite, rules_for, select_layers
from .spec import MixDQSpec, QuantizerSpec, QuantSpec, SVDQuantSpec
from .state import QuantStateMismatch, load_quant_state, quant_cache_key, read_header, save_quant_state

__all__ = [
    "KEYS", "FakeQuantLayer", "LayerRecord", "LayerSite", "MixDQSpec", "QuantInfo", "QuantReport", "QuantSpec",
    "QuantStateMismatch", "QuantizerSpec", "SVDQuantSpec", "algorithm_version", "dequantize", "fake_quant_layers",
    "is_implemented", "load_quant_state", "quant_cache_key", "quant_enabled", "quantize", "read_header", "rules_for",
    "save_quant_state", "select_layers",
]
