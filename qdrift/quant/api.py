"""`quantize`: turn a diffusers denoiser into its fake-quant twin, in place."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import mixdq, rtn, svdquant
from .layers import fake_quant_layers
from .mixdq import run_mixdq
from .report import LayerRecord, QuantReport
from .rtn import run_rtn
from .select import LayerSite, select_layers
from .spec import QuantSpec
from .svdquant import run_svdquant

log = logging.getLogger(__name__)

Calibrate = Callable[[int], torch.Tensor]
PASSES = {"svdquant": run_svdquant, "mixdq": run_mixdq, "rtn": run_rtn}
VERSIONS = {"none": 1, "svdquant": svdquant.ALGORITHM_VERSION, "mixdq": mixdq.ALGORITHM_VERSION,
            "rtn": rtn.ALGORITHM_VERSION}


@dataclass(frozen=True)
class QuantInfo:
    """Attached to a quantized denoiser (`denoiser._qdrift_quant`): what made it."""

    spec: QuantSpec
    family: str
    report: QuantReport


def is_implemented(spec: QuantSpec) -> bool:
    return spec.method == "none" or spec.method in PASSES


def algorithm_version(spec: QuantSpec) -> str:
    """The code version of the method that makes `spec`'s state, e.g. "svdquant/2": a cache-key field."""
    return f"{spec.method}/{VERSIONS[spec.method]}"


def _records(model: nn.Module, sites: list[LayerSite]) -> dict[str, LayerRecord]:
    recs = {}
    for s in sites:
        m = model.get_submodule(s.name)
        w = m.weight
        recs[s.name] = LayerRecord(
            name=s.name, key=s.key, kind=s.kind, role=s.role, params=w.numel(), out_features=w.shape[0],
            in_features=w[0].numel(), has_bias=m.bias is not None,
        )
    return recs


def new_report(model: nn.Module, spec: QuantSpec, family: str, sites: list[LayerSite],
               records: dict[str, LayerRecord]) -> QuantReport:
    in_layers = sum(records[s.name].params + (records[s.name].out_features if records[s.name].has_bias else 0)
                    for s in sites)
    total = sum(p.numel() for p in model.parameters())
    return QuantReport(spec.name, spec.method, family, [records[s.name] for s in sites], total - in_layers)


@torch.no_grad()
def quantize(denoiser: nn.Module, spec: QuantSpec, family: str, calibrate: Calibrate,
             progress: bool = True, resume_file: Path | None = None) -> QuantReport:
    """Replace the denoiser's selected layers by fake-quant twins (in place) and report what was done.

    `calibrate(n)` must run the pipeline on the first n calibration prompts with the denoiser as it
    is at that moment, and return the final images (N, 3, H, W) in [0, 1]. `resume_file`: where
    MixDQ's sensitivity search journals its finished runs, so a killed search resumes there.
    """
    if any(True for _ in fake_quant_layers(denoiser)):
        raise RuntimeError("the denoiser is already quantized; call dequantize() first")
    if not is_implemented(spec):
        raise NotImplementedError(f"quantization method {spec.method!r} is not implemented")
    sites = select_layers(denoiser, family, spec.skip)
    records = _records(denoiser, sites)
    if spec.method != "none":
        resumable = {"resume_file": resume_file} if spec.method == "mixdq" else {}
        PASSES[spec.method](denoiser, sites, spec, calibrate, records, progress, **resumable)
    report = new_report(denoiser, spec, family, sites, records)
    denoiser._qdrift_quant = QuantInfo(spec, family, report)
    log.info("%s", report.summary())
    return report
