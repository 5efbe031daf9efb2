"""Q-Drift's sampling-time overhead: corrected / uncorrected wall time of the same pipeline call.

    python experiments/bench_drift_overhead.py --model tiny_pixart --steps 20 --batch 4 --repeats 5
    python experiments/bench_drift_overhead.py --model bench_dit --device cuda
    python experiments/bench_drift_overhead.py --model flux_schnell --set model.source=random --json out.json

The correction adds no model evaluation, only a few elementwise ops per step; this prints the
median time per call with the plain scheduler, with Q-Drift (paper and exact) and the ratios, plus
the scheduler step alone (no model) to show the per-step cost in isolation.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from qdrift.drift import DriftStatistics, QDrift, wrap_scheduler
from qdrift.models.loaders import load_pipeline
from qdrift.samplers import make_scheduler
from qdrift.stages.context import RunContext
from qdrift.stages.sampling import call_pipeline


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny_pixart")
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--set", action="append", default=[], help="further config overrides (repeatable)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    import json
    import os

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    overrides = [f"model={args.model}", *([f"sampler={args.sampler}"] if args.sampler else []),
                 f"sampler.steps={args.steps}", f"device={args.device}", *args.set]
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    device = torch.device(args.device)
    ctx = RunContext(cfg, run_dir=None, device=device, prompts=[], prompt_set=None)
    ctx.pipe = load_pipeline(cfg.model, device)
    base = make_scheduler(cfg.sampler.name, ctx.pipe.scheduler, cfg.model.prediction)
    steps = args.steps
    z = torch.zeros(steps, 1, dtype=torch.float64)
    stats = DriftStatistics(z, z, z + 1, torch.linspace(0.001, 0.05, steps, dtype=torch.float64)[:, None], z)
    prompts = ["a red circle"] * args.batch
    seeds = list(range(args.batch))
    rows = {}
    for name, hook in [("plain", None), ("qdrift paper", QDrift(stats, mode="paper")),
                       ("qdrift exact", QDrift(stats, mode="exact"))]:
        sch = wrap_scheduler(base, hook)
        rows[name] = timed(lambda: call_pipeline(ctx, prompts, seeds, sch, output_type="latent"), device, args.repeats)
    # The scheduler step alone, on latents of the model's shape.
    shape = call_pipeline(ctx, prompts[:1], seeds[:1], wrap_scheduler(base, None), output_type="latent").shape
    x0 = torch.randn((args.batch, *shape[1:]), device=device)
    step_only = {}
    for name, hook in [("plain", None), ("qdrift paper", QDrift(stats, mode="paper"))]:
        sch = wrap_scheduler(base, hook)

        # FLUX's dynamic shifting needs a shift mu; its value moves the timesteps, not a step's cost.
        shift = {"mu": 1.0} if sch.config.get("use_dynamic_shifting") else {}

        def loop():
            sch.set_timesteps(steps, device=device, **shift)
            x = x0.clone()
            for t in sch.timesteps:
                x = sch.step(0.5 * x, t, x).prev_sample
        step_only[name] = timed(loop, device, args.repeats)
    print(f"model={args.model} sampler={cfg.sampler.name} steps={steps} batch={args.batch} device={device}")
    print("| variant | pipeline call (s) | ratio | scheduler steps only (ms) |")
    print("|---|---|---|---|")
    for name, t in rows.items():
        so = f"{1e3 * step_only[name]:.2f}" if name in step_only else "-"
        print(f"| {name} | {t:.3f} | {t / rows['plain']:.3f} | {so} |")
    # The correction's own cost per step, relative to a whole step of the plain pipeline call.
    overhead = (step_only["qdrift paper"] - step_only["plain"]) / rows["plain"]
    print(f"Q-Drift's scheduler-step cost: {100 * overhead:.3f} % of a plain step")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "overrides": overrides, "steps": steps, "batch": args.batch,
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "pipeline_call_s": rows, "scheduler_steps_s": step_only,
                       "overhead_per_step": overhead}, f, indent=2)


if __name__ == "__main__":
    main()
