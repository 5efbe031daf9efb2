"""One run on 1 GPU and the same run on N GPUs (torchrun): same PNGs byte for byte, same metrics, the
wall time of each stage and the speedup.

    python experiments/bench_scale_out.py OUT [--gpus 2] [run.py overrides ...]

Default run: the 2,000-prompt bench_dit SVDQuant W3A4 run with every corrector and CUDA graphs. Each
run gets its own empty cache, so both compute everything. Prints a table and writes OUT/scale_out.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["model=bench_dit", "quant=svdquant_w3a4", "corrector=all", "eval.num_prompts=2000", "batch_size=250",
           "cuda_graph=true", "device=cuda", "logger=none"]


def launch(out: Path, gpus: int, overrides: list[str], threads: int) -> tuple[Path, float]:
    where = out / f"gpus{gpus}"
    cmd = [sys.executable, "run.py", *overrides, f"output_root={where}", f"cache_dir={where}/cache"]
    if gpus > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, range(gpus))), PYTHONUNBUFFERED="1")
    # torchrun would give each rank one CPU thread: share the cores out, and give the 1-GPU run as many,
    # since the CPU's BLAS rounds FID's matrix square root differently with another thread count.
    env.setdefault("OMP_NUM_THREADS", str(threads))
    start = time.perf_counter()
    with open(out / f"gpus{gpus}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    took = time.perf_counter() - start
    log_tail = (out / f"gpus{gpus}.log").read_text()[-3000:]
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{log_tail}")
    return Path(proc.stdout.strip().splitlines()[-1]), took


def png_digests(run_dir: Path) -> dict[str, str]:
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((run_dir / "images").rglob("*.png"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gpus", type=int, default=2)
    args, overrides = ap.parse_known_args()   # the rest: run.py overrides (default: DEFAULT)
    overrides = overrides or DEFAULT
    args.out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.gpus)
    runs = {n: launch(args.out, n, overrides, threads) for n in (1, args.gpus)}
    metrics = {n: json.loads((d / "metrics.json").read_text()) for n, (d, _) in runs.items()}
    pngs = {n: png_digests(d) for n, (d, _) in runs.items()}
    one, many = metrics[1], metrics[args.gpus]
    stages = [s for s in ("build", "quantize", "calibrate", "generate", "evaluate") if s in one["timing"]]
    result = {
        "overrides": overrides, "gpus": args.gpus, "device": one["device"],
        "num_images": len(pngs[1]), "same_pngs": pngs[1] == pngs[args.gpus] and bool(pngs[1]),
        "differing_pngs": sorted(k for k in pngs[1] if pngs[1][k] != pngs[args.gpus].get(k))[:20],
        "same_metrics": one["variants"] == many["variants"],
        "wall_s": {n: round(took, 1) for n, (_, took) in runs.items()},
        "stage_s": {n: metrics[n]["timing"] for n in runs},
        "speedup": {s: round(one["timing"][s] / many["timing"][s], 2) for s in stages if many["timing"].get(s)},
        "run_dirs": {n: str(d) for n, (d, _) in runs.items()},
    }
    (args.out / "scale_out.json").write_text(json.dumps(result, indent=2))
    print(f"{'stage':<10} {'1 GPU (s)':>10} {f'{args.gpus} GPUs (s)':>11} {'speedup':>8}")
    for s in stages:
        print(f"{s:<10} {one['timing'][s]:>10.1f} {many['timing'][s]:>11.1f} {result['speedup'].get(s, 0):>7.2f}x")
    print(f"{'process':<10} {result['wall_s'][1]:>10.1f} {result['wall_s'][args.gpus]:>11.1f} "
          f"{result['wall_s'][1] / result['wall_s'][args.gpus]:>7.2f}x")
    print(f"same PNGs ({result['num_images']}): {result['same_pngs']}   same metrics: {result['same_metrics']}")


if __name__ == "__main__":
    main()
