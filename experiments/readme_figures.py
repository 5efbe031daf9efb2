"""The README's two figures, made by the report's own functions from committed or given results.

    python experiments/readme_figures.py RUN_DIR     # RUN_DIR: a bench run with corrector=all (image grid)

Writes docs/bench_grid.png (FP / quantized / each corrector / reference for the first prompts of
RUN_DIR) and docs/bench_gap_recovered.png (mean gap recovered per setting of the committed replicated
bench table, experiments/results/bench_table_replicated, with its 95% t-interval over replicates).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from qdrift import figures
from qdrift.report import drop_reruns, load_runs, replicate_groups, replicate_summary

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    run_dir = Path(sys.argv[1])
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    n = json.loads((run_dir / "metrics.json").read_text())["num_prompts"]
    (docs / "bench_grid.png").write_bytes(figures.image_grid(run_dir, n, count=8))
    runs = drop_reruns(load_runs([ROOT / "experiments" / "results" / "bench_table_replicated"]))
    labels, gaps = [], []
    for _, members in replicate_groups(runs)[1]:
        r = members[0]
        labels.append(f"{r.flat['model.name']}/{r.flat['sampler.name']}\n{r.flat['quant.name']}")
        summary = replicate_summary(members, r.correctors)
        gaps.append({c: summary[c]["gap"] for c in r.correctors})
    # The paper rule's losses reach -3,600 %: the axis stops at +-100 % and labels what it cuts.
    (docs / "bench_gap_recovered.png").write_bytes(figures.gap_recovered_figure(labels, gaps, limit=100))
    print(docs / "bench_grid.png", docs / "bench_gap_recovered.png")


if __name__ == "__main__":
    main()
