"""Analytic testbed (method.md section 8): every sampler, both error settings, FP / quantized / every corrector.

    python experiments/analytic_testbed.py --steps 100 20 --json experiments/results/analytic_testbed.json

Settings (qdrift/drift/testbed.py SETTINGS): `noise`, fresh Gaussian noise only (what Q-Drift models);
`correlated`, the same noise plus a part proportional to the FP output and a constant bias (what PTQD,
D^2-DPM and cumulative compensation model). Prints a markdown table per setting and step count: W1
distance of the final samples to the FP sampler's output (x1000); with --cells full each cell also has
the W1 distance to the true data and the within-mode std's offset from the FP sampler's (x1000).
"""
from __future__ import annotations

import argparse
import json
import time

from qdrift.drift import testbed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 20])
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--runs", type=int, default=5, help="calibration runs K")
    ap.add_argument("--samplers", nargs="+", default=list(testbed.KINDS))
    ap.add_argument("--settings", nargs="+", default=list(testbed.SETTINGS), choices=list(testbed.SETTINGS))
    ap.add_argument("--cells", choices=["w1", "full"], default="w1")
    ap.add_argument("--json", help="also write all numbers to this file")
    args = ap.parse_args()
    variants = [v for v in testbed.VARIANTS if v != "fp"]
    print(f"data: {testbed.Mixture()}\nK = {args.runs}, {args.samples} x 16 samples per variant\n")
    everything = {}
    for setting in args.settings:
        error = testbed.SETTINGS[setting]
        for steps in args.steps:
            print(f"### {setting}: {error}, {steps} steps\n")
            print("| sampler | " + " | ".join(variants) + " | FP: W1 to data |")
            print("|---|" + "---|" * (len(variants) + 1))
            for kind in args.samplers:
                start = time.perf_counter()
                r = testbed.run(kind, steps=steps, num_samples=args.samples, num_runs=args.runs, error=error)
                everything[f"{setting}/{kind}/{steps}"] = r
                fp_std = r["fp"]["mode_std"]
                best = min(variants, key=lambda v: r[v]["w1_to_fp"])
                cells = []
                for v in variants:
                    cell = f"{1e3 * r[v]['w1_to_fp']:.2f}"
                    if args.cells == "full":
                        cell += f" / {1e3 * r[v]['w1_to_data']:.2f} / {1e3 * (r[v]['mode_std'] - fp_std):+.1f}"
                    cells.append(f"**{cell}**" if v == best else cell)
                print(f"| {kind} | " + " | ".join(cells) + f" | {1e3 * r['fp']['w1_to_data']:.2f} |"
                      f"  <!-- {time.perf_counter() - start:.0f}s -->")
            print()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": {s: repr(testbed.SETTINGS[s]) for s in args.settings}, "runs": args.runs,
                       "samples": args.samples, "results": everything}, f, indent=1)


if __name__ == "__main__":
    main()
