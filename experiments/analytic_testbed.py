"""Analytic testbed (method.md section 8): every sampler, FP / quantized / Q-Drift (paper, exact) / PTQD / D^2-DPM.

    python experiments/analytic_testbed.py --steps 20 50 100 --samples 4096

Prints a markdown table per step count: W1 distance of the final samples to the FP sampler's
output and to the true data (x1000), and the within-mode std's offset from the FP sampler's (x1000).
"""
from __future__ import annotations

import argparse
import json
import time

from qdrift.drift import testbed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50, 100])
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=5, help="calibration runs K")
    ap.add_argument("--samplers", nargs="+", default=list(testbed.SAMPLERS))
    ap.add_argument("--json", help="also write all numbers to this file")
    args = ap.parse_args()
    error = testbed.QuantError()
    print(f"data: {testbed.Mixture()}\nerror: {error}\nK = {args.runs}, {args.samples} x 16 samples per variant\n")
    everything = {}
    for steps in args.steps:
        print(f"### {steps} steps\n")
        print("| sampler | " + " | ".join(v for v in testbed.VARIANTS if v != "fp") + " |")
        print("|---|" + "---|" * (len(testbed.VARIANTS) - 1))
        for kind in args.samplers:
            start = time.perf_counter()
            r = testbed.run(kind, steps=steps, num_samples=args.samples, num_runs=args.runs, error=error)
            everything[f"{kind}/{steps}"] = r
            fp_std = r["fp"]["mode_std"]
            cells = [f"{1e3 * r[v]['w1_to_fp']:.2f} / {1e3 * r[v]['w1_to_data']:.2f} / {1e3 * (r[v]['mode_std'] - fp_std):+.1f}"
                     for v in testbed.VARIANTS if v != "fp"]
            print(f"| {kind} | " + " | ".join(cells) + f" |  <!-- {time.perf_counter() - start:.0f}s, "
                  f"FP: W1 to data {1e3 * r['fp']['w1_to_data']:.2f}, mode std {1e3 * fp_std:.1f} -->")
        print("\ncells: W1 to FP sampler / W1 to data / within-mode std minus FP's (all x1000)\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
