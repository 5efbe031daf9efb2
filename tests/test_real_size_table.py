"""experiments/real_size_table.py: one row per setting from a run's metrics.json, as Markdown."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import real_size_table  # noqa: E402


def test_a_settings_run_becomes_a_row_with_its_prompts_and_one_row_cost(tmp_path):
    run = tmp_path / "sana_svdquant_w3a4" / "runs" / "2026-12-01" / "00-00-00_x"
    run.mkdir(parents=True)
    timing = {"build": 10.0, "quantize": 90.0, "calibrate": 7.0, "evaluate": 64.0,
              "s_per_image/fp": 0.8, "s_per_image/quant": 1.0, "s_per_image/qdrift": 1.0}
    cfg = {"model": {"resolution": 1024}, "sampler": {"steps": 20, "name": "dpmpp"}, "batch_size": 4}
    (run / "metrics.json").write_text(json.dumps({"timing": timing, "config": cfg, "num_prompts": 64,
                                                  "gpu": "NVIDIA H200", "peak_gpu_memory_gib": 22.7}))
    row = real_size_table.row(tmp_path / "sana_svdquant_w3a4", tmp_path / "none.json", efficiency=0.9)
    # 5,000 prompts x (0.8 + 1.0 + 1.0 + 64 / 64) s, plus build, quantize and calibrate once.
    assert row["row_gpu_hours_1"] == round((107 + 5000 * 3.8) / 3600, 2)
    assert row["row_wall_hours_8"] == round((107 + 5000 * 3.8 / (8 * 0.9)) / 3600, 2)
    lines = real_size_table.markdown([row]).splitlines()
    assert "| prompts |" in lines[0] and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert lines[2].startswith("| sana_svdquant_w3a4 | NVIDIA H200 | 1024, 20 | 4 | 64 | 0.800 / 1.000 / 1.000 |")
    assert lines[2].endswith("| 22.7 | 90 | 7.0 | - % | 5.31 | 0.76 |")    # no overhead benchmark: "-"
