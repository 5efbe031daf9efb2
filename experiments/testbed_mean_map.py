"""Q-Drift+ with and without the mean error map (`mean_map_runs: 64`) on the analytic testbed.

    python experiments/testbed_mean_map.py > experiments/results/testbed_mean_map.txt

W1 distance to the FP sampler's output (x1000), every sampler, 20 and 100 steps, 4096 x 16 samples; the map
from 64 teacher-forced runs of its own (testbed.mean_error_map). The testbed's bias is constant, so the map
has no spatial pattern to find: what it changes is a channel mean from 64 runs instead of K = 5.
"""
from __future__ import annotations

from qdrift.drift import make_corrector, testbed


def main() -> None:
    print("steps | setting | sampler | quant | Q-Drift+ | Q-Drift+ with the map")
    for steps in (20, 100):
        for setting, error in testbed.SETTINGS.items():
            for kind in testbed.KINDS:
                m = testbed.mean_error_map(kind, steps, error=error)

                def correctors(pool, n, m=m):
                    stats = pool.fit(n, "channel")
                    return {"plus": make_corrector("qdrift", stats, **testbed.plus_options()),
                            "plus_map": make_corrector("qdrift", stats, **testbed.plus_options(),
                                                       mean_map_runs=64).use_mean_map(m)}

                r = testbed.run(kind, steps=steps, num_samples=4096, error=error, make_correctors=correctors)
                print(f"{steps} | {setting} | {kind} | " + " | ".join(
                    f"{1e3 * r[v]['w1_to_fp']:.2f}" for v in ("quant", "plus", "plus_map")), flush=True)


if __name__ == "__main__":
    main()
