"""The real-size table from experiments/bench_real_size.sh's output (Markdown on stdout, JSON beside it).

    python experiments/real_size_table.py OUT [SCALE_OUT_JSON] > real_size.md

Per setting: seconds per image of each variant, peak GPU memory, quantize and calibration (K = 5)
time, Q-Drift's cost per sampling step, and the time one paper row needs at 5,000 prompts (FP,
quantized and Q-Drift images, quantization, calibration, evaluation): GPU-hours on one GPU, and the
wall-clock hours on 8 GPUs extrapolated from the generate-stage speedup measured on 1 and 2 GPUs
(experiments/bench_scale_out.py): generation and evaluation at that efficiency per GPU,
quantization and calibration on one GPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROW_PROMPTS = 5000
ROW_VARIANTS = ("fp", "quant", "qdrift")


def row(setting_dir: Path, overhead_file: Path, efficiency: float | None) -> dict | None:
    found = sorted(setting_dir.glob("runs/*/*/metrics.json"))
    if not found:
        return None
    m = json.loads(found[-1].read_text())
    t, cfg = m["timing"], m["config"]
    per_image = {v: t.get(f"s_per_image/{v}") for v in ROW_VARIANTS}
    fixed = t.get("build", 0) + t.get("quantize", 0) + t.get("calibrate", 0)
    scaled = ROW_PROMPTS * (sum(x or 0 for x in per_image.values()) + t["evaluate"] / m["num_prompts"])
    out = {
        "setting": setting_dir.name, "gpu": m.get("gpu"), "resolution": cfg["model"]["resolution"],
        "steps": cfg["sampler"]["steps"], "sampler": cfg["sampler"]["name"], "prompts": m["num_prompts"],
        "batch_size": cfg["batch_size"], "s_per_image": per_image, "peak_gpu_memory_gib": m.get("peak_gpu_memory_gib"),
        "quantize_s": t.get("quantize"), "calibrate_s": t.get("calibrate"), "evaluate_s": t.get("evaluate"),
        "row_gpu_hours_1": round((fixed + scaled) / 3600, 2),
    }
    if efficiency:
        out["row_wall_hours_8"] = round((fixed + scaled / (8 * efficiency)) / 3600, 2)
    if overhead_file.is_file():
        out["qdrift_overhead_per_step"] = json.loads(overhead_file.read_text())["overhead_per_step"]
    return out


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    efficiency = None
    if len(sys.argv) > 2:
        scale = json.loads(Path(sys.argv[2]).read_text())
        efficiency = scale["speedup"]["generate"] / scale["gpus"]
    rows = [r for d in sorted(p for p in out.iterdir() if p.is_dir())
            if (r := row(d, out / f"{d.name}.overhead.json", efficiency))]
    (out / "real_size.json").write_text(json.dumps({"rows": rows, "efficiency_per_gpu": efficiency}, indent=2))
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | card | px, steps | batch | prompts | s/img FP / quant / Q-Drift | peak GiB | quantize s | "
             "calibrate K=5 s | Q-Drift per step | row GPU-h (1 GPU) | row wall h (8 GPUs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["s_per_image"]
        oh = r.get("qdrift_overhead_per_step")
        lines.append(
            f"| {r['setting']} | {r['gpu']} | {r['resolution']}, {r['steps']} | {r['batch_size']} | {r['prompts']} | "
            f"{fmt(s['fp'], '.3f')} / {fmt(s['quant'], '.3f')} / {fmt(s['qdrift'], '.3f')} | "
            f"{fmt(r['peak_gpu_memory_gib'], '.1f')} | {fmt(r['quantize_s'], '.0f')} | {fmt(r['calibrate_s'], '.1f')} | "
            f"{fmt(None if oh is None else 100 * oh, '.3f')} % | {fmt(r['row_gpu_hours_1'])} | "
            f"{fmt(r.get('row_wall_hours_8'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
