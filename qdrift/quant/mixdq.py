"""MixDQ (Zhao et al., 2024): BOS-aware, sensitivity-driven mixed-precision quantization.

1. Ranges: one FP calibration run records every layer's input min/max (per tensor); for
   cross-attention K/V the first text token (BOS) is left out, since its K/V are computed in
   full precision at run time (its huge, prompt-independent values would otherwise set the range).
2. Sensitivity, "metric-decoupled": quantize one layer at a time (weights at each option in
   `w_options`, activations at each option in `a_options`), run the calibration prompts, and
   compare the final images with the FP ones. Content layers (cross-attention, FFN) are scored by
   image dissimilarity (1 - SSIM), the rest ("quality") by noise-to-signal power
   10^(-SQNR/10). Each group is normalised by its mean error at the lowest option so the two
   scales can be summed.
3. Allocation: an integer program per tensor kind picks bits per layer minimising the summed
   sensitivity under the average-bit budget (weights weighted by parameters, activations by
   elements per call); then the `keep_fp_acts` most sensitive activation layers stay 16-bit.
   When the budget admits the largest option for every layer the program has only one answer
   and is skipped (W8A8; activations of W4A8).
4. Final layers: weights per-channel symmetric min-max, activations per-tensor static min-max.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qdrift.cache import atomic_write_json
from qdrift.progress import progress as progress_bar

from .bitalloc import allocate_bits
from .layers import replace_module
from .report import LayerRecord, layer_line
from .rtn import fill_record, minmax_layer, observe_ranges
from .select import LayerSite
from .spec import QuantSpec

log = logging.getLogger(__name__)

# Part of the quantized state's cache key: bump when a change alters the quantized state (here or in
# the primitives, layers and helpers this pass calls).
# Its final and probe layers are rtn's `minmax_layer`: a change there bumps both.
# 2: a constant divides as a product with its float32 reciprocal on every device (primitives.div_const);
# the activation kernel rounds as the reference (sensitivity runs on CUDA use it).
ALGORITHM_VERSION = 2
JOURNAL_EVERY_S = 30.0   # how often a sensitivity search saves its finished runs


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM of images in [0, 1] (uniform window; data range 1)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    k = min(window, a.shape[-1], a.shape[-2])
    pool = lambda t: F.avg_pool2d(t, k, stride=1)  # noqa: E731
    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a**2
    var_b = pool(b * b) - mu_b**2
    cov = pool(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return m.mean().item()


def noise_to_signal(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref||^2 / ||ref||^2 = 10^(-SQNR/10)."""
    a, ref = a.to(torch.float64), ref.to(torch.float64)
    return ((a - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-30)).item()


def image_error(site: LayerSite, images: torch.Tensor, ref: torch.Tensor) -> float:
    return 1.0 - ssim(images, ref) if site.group == "content" else noise_to_signal(images, ref)


def _normalised(errors: np.ndarray, groups: list[str]) -> np.ndarray:
    """Divide each group's errors by its mean error at the lowest option (column 0)."""
    out = errors.copy()
    for g in set(groups):
        rows = np.array([x == g for x in groups])
        out[rows] /= max(errors[rows, 0].mean(), 1e-30)
    return out


def _largest_within(options: tuple[int, ...], budget: int) -> int:
    return max(b for b in options if b <= budget)


class SensitivityLog:
    """Finished sensitivity runs in a JSON file, so that a killed search resumes where it stopped.

    The search is the long part of MixDQ (one pipeline call per layer and option: about 3,000 calls
    on SDXL). The file belongs to one quantization (its cache entry names it) and is written at most
    every `every_s` seconds; a run measured twice gives the same number, so resuming changes nothing.
    """

    def __init__(self, path: Path | None, every_s: float):
        self.path, self.every_s, self.last = path, every_s, time.monotonic()
        self.done: dict[str, float] = {}
        if path is not None and path.is_file():
            try:
                entries = json.loads(path.read_text())["sensitivity"].items()
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                log.warning("ignoring unreadable MixDQ sensitivity log %s (%s)", path, err)
            else:
                # Only finite numbers: anything else is measured again (a NaN would reach the bit allocation).
                self.done = {str(k): float(v) for k, v in entries
                             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
                if len(self.done) < len(entries):
                    log.warning("MixDQ sensitivity log %s: %d entries are not finite numbers; measuring them again",
                                path, len(entries) - len(self.done))
                log.info("MixDQ: resuming the sensitivity search, %d runs already measured (%s)", len(self.done), path)

    def add(self, key: str, value: float) -> None:
        self.done[key] = value
        if self.path is not None and time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"sensitivity": self.done})
            self.last = time.monotonic()


def run_mixdq(model: nn.Module, sites: list[LayerSite], spec: QuantSpec, calibrate,
              records: dict[str, LayerRecord], progress: bool, resume_file: Path | None = None) -> None:
    mix = spec.mixdq
    w_opts, a_opts = tuple(sorted(mix.w_options)), tuple(sorted(mix.a_options))
    w_budget, a_budget = spec.weights.bits, spec.acts.bits
    targets = [s for s in sites if s.role != "fp16"]
    observers = observe_ranges(model, [s for s in targets if s.role == "quant"], calibrate, spec.calib_prompts,
                               bos_aware=mix.bos_aware)
    act_sites = [s for s in targets if s.role == "quant" and observers[s.name].calls > 0]
    bos = {s.name: mix.bos_aware and s.tokens_first for s in targets}
    n_sens = min(mix.sensitivity_prompts, spec.calib_prompts)   # the runner prepares calib_prompts prompts

    # ---- sensitivity: one calibration run per (layer, tensor kind, option)
    w_measure = w_opts if w_budget < max(w_opts) else ()
    a_measure = a_opts if a_budget < max(a_opts) else (a_opts[-1:] if mix.keep_fp_acts else ())
    jobs = [(s, "w", b) for s in targets for b in w_measure] + [(s, "a", b) for s in act_sites for b in a_measure]
    journal = SensitivityLog(resume_file, JOURNAL_EVERY_S)
    todo = [job for job in jobs if f"{job[0].name}/{job[1]}{job[2]}" not in journal.done]
    ref = calibrate(n_sens) if todo else None
    for s, kind, b in progress_bar(todo, desc=f"{spec.name}: sensitivity", nested=True, disable=not progress):
        orig = model.get_submodule(s.name)
        probe = minmax_layer(orig, s, spec, b if kind == "w" else 16, b if kind == "a" else 16,
                             observers.get(s.name), bos_fp=bos[s.name])
        replace_module(model, s.name, probe)
        try:
            images = calibrate(n_sens)
        finally:
            replace_module(model, s.name, orig)
        journal.add(f"{s.name}/{kind}{b}", image_error(s, images, ref))
    journal.flush()
    sens: dict[tuple[str, str, int], float] = {}
    for s, kind, b in jobs:
        sens[s.name, kind, b] = journal.done[f"{s.name}/{kind}{b}"]
        records[s.name].sensitivity[f"{kind}{b}"] = sens[s.name, kind, b]

    # ---- allocation
    w_bits = {s.name: _largest_within(w_opts, w_budget) for s in targets}
    if w_measure:
        errs = _normalised(np.array([[sens[s.name, "w", b] for b in w_opts] for s in targets]),
                           [s.group for s in targets])
        sizes = np.array([model.get_submodule(s.name).weight.numel() for s in targets])
        w_bits = dict(zip([s.name for s in targets], allocate_bits(errs, sizes, w_opts, w_budget).tolist()))
    a_bits = {s.name: _largest_within(a_opts, a_budget) for s in act_sites}
    if a_measure:
        errs = _normalised(np.array([[sens[s.name, "a", b] for b in a_measure] for s in act_sites]),
                           [s.group for s in act_sites]) if act_sites else np.zeros((0, len(a_measure)))
        if a_budget < max(a_opts):
            sizes = np.array([observers[s.name].tokens / observers[s.name].calls * observers[s.name].ch_min.numel()
                              for s in act_sites])
            a_bits = dict(zip([s.name for s in act_sites], allocate_bits(errs, sizes, a_opts, a_budget).tolist()))
        chosen = np.array([errs[i, a_measure.index(a_bits[s.name])] for i, s in enumerate(act_sites)])
        for i in np.argsort(-chosen, kind="stable")[: mix.keep_fp_acts]:
            a_bits[act_sites[i].name] = 16          # the most sensitive activations stay 16-bit

    # ---- final layers
    for s in targets:
        layer = minmax_layer(model.get_submodule(s.name), s, spec, int(w_bits[s.name]), int(a_bits.get(s.name, 16)),
                             observers.get(s.name), bos_fp=bos[s.name])
        replace_module(model, s.name, layer)
        fill_record(records[s.name], layer)
        log.info(layer_line(records[s.name]))
