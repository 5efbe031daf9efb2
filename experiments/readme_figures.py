"""The README's two figures, made by the report's own functions from committed or given results.

    python experiments/readme_figures.py RUN_DIR     # RUN_DIR: a bench run with corrector=all (image grid)

Writes docs/bench_grid.png (FP / quantized / each corrector / reference for the first prompts of
RUN_DIR) and docs/bench_gap_recovered.png (gap recovered per setting of the committed bench table,
experiments/results/bench_table).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from qdrift import figures
from qdrift.report import gap_recovered, load_runs

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run_dir = Path(sys.argv[1])
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    n = json.loads((run_dir / "metrics.json").read_text())["num_prompts"]
    (docs / "bench_grid.png").write_bytes(figures.image_grid(run_dir, n, count=8))
    runs = load_runs([ROOT / "experiments" / "results" / "bench_table"])
    labels = [f"{r.flat['model.name']}/{r.flat['sampler.name']}\n{r.flat['quant.name']}" for r in runs]
    gaps = [{v: gap_recovered(r.variants, v) for v in r.correctors} for r in runs]
    (docs / "bench_gap_recovered.png").write_bytes(figures.gap_recovered_figure(labels, gaps))
    print(docs / "bench_grid.png", docs / "bench_gap_recovered.png")


if __name__ == "__main__":
    main()
