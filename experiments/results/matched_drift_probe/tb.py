import sys, time
from qdrift.drift import testbed, make_corrector
steps = int(sys.argv[1])
for setting in ["noise", "correlated", "biased"]:
    err = testbed.SETTINGS[setting]
    for kind in ["euler", "flow_euler", "dpmpp", "dpmpp_flow", "ddim"]:
        t = time.time()
        mk = lambda pool, n: {"paper": make_corrector("qdrift", pool.fit(n, "scalar"), mode="paper"),
                              "exact": make_corrector("qdrift", pool.fit(n, "scalar"), mode="exact"),
                              "plus": make_corrector("qdrift", pool.fit(n, "channel"), **testbed.plus_options()),
                              "matched": testbed.fit_matched(pool.fit(n, "channel"), kind, steps, error=err),
                              "matched_mr": testbed.fit_matched(pool.fit(n, "channel"), kind, steps, error=err, mean_removal=testbed.plus_options()["mean_removal"])}
        r = testbed.run(kind, steps=steps, num_samples=4096, error=err, make_correctors=mk)
        print(setting, kind, " ".join(f"{v}:{1e3*r[v]['w1_to_fp']:.2f}" for v in ["quant", "paper", "exact", "plus", "matched", "matched_mr"]), f"{time.time()-t:.0f}s", flush=True)
