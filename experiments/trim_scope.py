"""Outlier trimming per run and step (our calibration) vs over all runs of a step (the authors'): V_i both ways.

    python experiments/trim_scope.py --model bench_dit --quant svdquant_w3a4 --sampler dpmpp --runs 5

Quantizes the model (or loads its cached state), runs the K paired calibration runs exactly as the
calibrate stage does (same prompts, seeds, FP trajectory, teacher-forced quantized pass), keeps the raw
(u, e) of every step, and fits V_i = s_ee - s_ue^2 / s_uu with the error trimmed at trim_std standard
deviations (a) within each run and step, (b) over all K runs of a step at once, (c) not at all.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from hydra import compose, initialize_config_dir

from qdrift.drift import TeacherForcing, TrajectoryRecorder, moments, wrap_scheduler
from qdrift.drift.layout import by_channel
from qdrift.prompts import prompt_set
from qdrift.quant import quant_enabled
from qdrift.stages.build import build
from qdrift.stages.context import RunContext
from qdrift.stages.quantize import quantize_stage
from qdrift.stages.sampling import call_pipeline


class RawPairs:
    """Stands in for the calibration accumulator: keeps each step's (u, e) as (runs, channels, positions)."""

    def __init__(self, layout: str):
        self.layout, self.u, self.e = layout, {}, {}

    def add(self, i, u_quant, u_fp):
        u = by_channel(u_quant.detach().double(), self.layout).cpu()
        self.u[i], self.e[i] = u, u - by_channel(u_fp.detach().double(), self.layout).cpu()


def residual_var(u, e, trim_std, over):
    """V per step from rows (K, ..., L) trimmed with thresholds pooled over `over`, then merged over runs."""
    cov = moments.covariance(moments.reduce(moments.trimmed_moments(u, e, trim_std, over), 0))
    return (cov["s_ee"] - cov["s_ue"] ** 2 / cov["s_uu"]).clamp_min(0), cov["n"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench_dit")
    ap.add_argument("--quant", default="svdquant_w3a4")
    ap.add_argument("--sampler", default="dpmpp")
    ap.add_argument("--runs", type=int, default=5, help="calibration runs K")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="further config overrides (repeatable)")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    overrides = [f"model={args.model}", f"quant={args.quant}", f"sampler={args.sampler}", f"device={args.device}",
                 f"calib.num_runs={args.runs}", "logger=none", *args.set]
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    start = time.perf_counter()
    ctx = RunContext(cfg, run_dir=None, device=torch.device(args.device), prompts=[], prompt_set=prompt_set(cfg.eval))
    build(ctx)
    quantize_stage(ctx)
    prompts = ctx.prompt_set.calib_prompts(args.runs)         # the calibrate stage's runs 0..K-1
    seeds = [int(cfg.calib.seed) + k for k in range(args.runs)]
    recorder, raw = TrajectoryRecorder(), RawPairs(ctx.family.latent_layout)
    for hook, quantized in ((recorder, False), (TeacherForcing(recorder, raw), True)):
        with quant_enabled(ctx.denoiser, quantized):
            call_pipeline(ctx, prompts, seeds, wrap_scheduler(ctx.base_scheduler, hook), output_type="latent")
    trim = float(cfg.calib.trim_std)
    steps = sorted(raw.u)
    rows = {"scalar": {}, "channel": {}}
    for pooling in rows:
        for scope, over in (("per_run", (-1,)), ("global", (0, -1)), ("none", None)):
            v, n = [], []
            for i in steps:
                u, e = raw.u[i], raw.e[i]
                if pooling == "scalar":
                    u, e = u.reshape(u.shape[0], -1), e.reshape(e.shape[0], -1)
                vi, ni = residual_var(u, e, trim if over else 0.0, over or (-1,))
                v.append(vi)
                n.append(ni / (u.numel() / ni.numel()))   # the fraction of samples kept
            rows[pooling][scope] = {"V": torch.stack(v), "kept": torch.stack(n)}
    print(f"{args.model} {args.quant} {args.sampler} K={args.runs} trim_std={trim}: "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| step | V per run (ours) | V global | V untrimmed | global / per run | kept per run | kept global |")
    print("|---|---|---|---|---|---|---|")
    s = rows["scalar"]
    for j, i in enumerate(steps):
        pr, gl, no = (float(s[k]["V"][j]) for k in ("per_run", "global", "none"))
        print(f"| {i} | {pr:.4g} | {gl:.4g} | {no:.4g} | {gl / pr:.4f} | {float(s['per_run']['kept'][j]):.4%} | "
              f"{float(s['global']['kept'][j]):.4%} |")
    for pooling in rows:
        ratio = rows[pooling]["global"]["V"] / rows[pooling]["per_run"]["V"]
        print(f"\n{pooling}: V global / per run over steps{' and channels' if pooling == 'channel' else ''}: "
              f"min {float(ratio.min()):.4f}, median {float(ratio.median()):.4f}, max {float(ratio.max()):.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"overrides": overrides, "trim_std": trim, "steps": steps,
                       "results": {p: {k: {m: t.tolist() for m, t in d.items()} for k, d in r.items()}
                                   for p, r in rows.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
