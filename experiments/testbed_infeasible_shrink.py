#!/usr/bin/env python
"""Q-Drift+ with `infeasible: shrink` on the analytic testbed, next to Q-Drift+ as shipped (`skip`), the
paper and exact rules and D-D^2 (README, "Beyond the paper"). W1 distance to the FP sampler's output x1000,
every sampler and error setting, 20 and 100 steps; 4096 x 16 samples, K = 5.

    python experiments/testbed_infeasible_shrink.py > experiments/results/testbed_infeasible_shrink.txt
"""
from __future__ import annotations

import time

import torch

from qdrift.drift import testbed
from qdrift.drift.correctors import make_corrector

SHOWN = ("qdrift_paper", "qdrift_exact", "qdrift_plus", "d2dpm")


def with_shrink(pool, num_runs: int) -> dict:
    out = {k: v for k, v in testbed.correctors(pool, num_runs).items() if k in SHOWN}
    options = testbed.plus_options() | {"infeasible": "shrink"}
    out["qdrift_plus_shrink"] = make_corrector("qdrift", pool.fit(num_runs, "channel"), **options)
    return out


def main() -> None:
    torch.set_num_threads(1)
    for steps in (20, 100):
        for setting in testbed.SETTINGS:
            for kind in testbed.KINDS:
                start = time.perf_counter()
                r = testbed.run(kind, steps=steps, num_samples=4096, error=testbed.SETTINGS[setting],
                                make_correctors=with_shrink)
                cells = " ".join(f"{k}={1e3 * v['w1_to_fp']:.2f}" for k, v in r.items() if k not in ("fp", "data"))
                print(f"{steps} {setting:10s} {kind:12s} {cells}  ({time.perf_counter() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
