"""experiments/bench_quant_speed.py runs end to end (tiny config on CPU) and writes its JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_quant_speed.py"


def test_bench_quant_speed_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_quant_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bench.main(["--tiny", "--out", str(out), "--iters", "2", "--warmup", "1"])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    variants = [r["variant"] for r in result["rows"]]
    assert variants == ["fp32", "svdquant_w4a4", "svdquant_w3a4", "svdquant_nvfp4", "mixdq_w4a8", "mixdq_w8a8",
                        "rtn_w8a8"]
    for r in result["rows"][1:]:
        assert r["step_ms"] > 0 and 0 < r["rel_err"] < 1 and r["avg_w_bits"] <= 8
    assert "| svdquant_w4a4 |" in capsys.readouterr().out
