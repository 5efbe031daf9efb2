#!/usr/bin/env python
"""Where a run's quantization error sits, step by step, from its calibration statistics (no model runs):
what each corrector can reach (README, "Beyond the paper").

    python experiments/gap_sources.py outputs/runs/<date>/<run> [--json out.json]

Per step (channel-pooled fits averaged over channels; K = the run's calib.num_runs):
- V: the conditional residual variance E[Var(e | u)] that Q-Drift's drift rules correct;
- mean share: mu_e^2 / E[e^2], the systematic part (what mean removal, cumcomp, PTQD's bias remove);
- slope share: the part explained linearly by the FP output u_fp (PTQD's k u_fp);
- noise share: what is left, uncorrelated with u_fp (what the drift rules treat as noise);
- exact: whether the exact rule's sigma' exists at that step for the run's sampler (else it skips the step,
  and `infeasible=closest` lands as near as it can).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from qdrift.config import probe_scheduler
from qdrift.drift.rules import _levels, schedule_of, x0_variance
from qdrift.drift.statistics import CalibrationPool


def gap_sources(run_dir: Path) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    pool = CalibrationPool.load(run_dir / "stats" / "pool.safetensors")
    k = int(cfg.calib.num_runs)
    ch, sc = pool.fit(k, "channel"), pool.fit(k, "scalar")
    energy = ch.mu_e**2 + ch.s_ee                                   # E[e^2] per step and channel
    # Correlation with the FP output u_fp = u - e, not with u: e is part of u, so even independent noise
    # correlates with u (rho^2 = Var(e) / Var(u)), and E[e | u]'s slope is largely that shrinkage.
    s_ff, s_ef = ch.s_uu - 2 * ch.s_ue + ch.s_ee, ch.s_ue - ch.s_ee
    rho2 = torch.where(s_ff * ch.s_ee > 0, s_ef**2 / (s_ff * ch.s_ee).clamp_min(1e-300), torch.zeros_like(ch.s_ee))
    mean_share = (ch.mu_e**2 / energy).mean(1)
    slope_share = (rho2 * ch.s_ee / energy).mean(1)
    noise_share = ((1 - rho2) * ch.s_ee / energy).mean(1)
    schedule = schedule_of(probe_scheduler(cfg))
    a_i, s_i, a_n, s_n = _levels(schedule)
    W = x0_variance(schedule, sc.residual_var.double())
    rho = a_i / s_i
    feasible = (s_n**2 * (1 + rho**2 * W) - a_n**2 * W >= 0)[:, 0]
    steps = [{"step": i, "V": float(sc.residual_var[i, 0]), "mean_share": float(mean_share[i]),
              "slope_share": float(slope_share[i]), "noise_share": float(noise_share[i]),
              "exact_feasible": bool(feasible[i])} for i in range(pool.num_steps)]
    return {"run": str(run_dir), "model": cfg.model.name, "sampler": cfg.sampler.name, "quant": cfg.quant.name,
            "K": k, "steps": steps,
            "mean": {key: sum(s[key] for s in steps) / len(steps) for key in ("mean_share", "slope_share", "noise_share")},
            "infeasible_steps": [s["step"] for s in steps if not s["exact_feasible"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = [gap_sources(r) for r in args.runs]
    for r in out:
        print(f"\n{r['model']} / {r['sampler']} / {r['quant']}, K = {r['K']}: error energy shares averaged over steps "
              f"mean {r['mean']['mean_share']:.3f}, slope {r['mean']['slope_share']:.3f}, noise "
              f"{r['mean']['noise_share']:.3f}; exact rule infeasible at steps {r['infeasible_steps'] or 'none'}")
        print("| step | V | mean share | slope share | noise share | exact feasible |\n|---|---|---|---|---|---|")
        for s in r["steps"]:
            print(f"| {s['step']} | {s['V']:.4f} | {s['mean_share']:.3f} | {s['slope_share']:.3f} | "
                  f"{s['noise_share']:.3f} | {'yes' if s['exact_feasible'] else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
