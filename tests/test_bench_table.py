"""experiments/bench_table.py: run directories -> one markdown row per setting and variant."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_table", ROOT / "experiments" / "bench_table.py")
bench_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_table)


def _run(path: Path, model: str, delta: float, k: int = 5) -> None:
    path.mkdir(parents=True)
    config = {"model": {"name": model}, "sampler": {"name": "dpmpp", "steps": 20},
              "quant": {"name": "svdquant_w3a4"}, "calib": {"num_runs": k}}
    variants = {  # written with sorted keys, like the runner's metrics.json
        "fp": {"fid": 0.09, "kid_mean": 8e-4, "kid_std": 4e-4, "clip_score": 66.0, "clip_score_ci_low": 65.0,
               "clip_score_ci_high": 67.0},
        "qdrift": {"fid": 0.18, "kid_mean": 2e-3, "clip_score": 60.0, "fid_delta_vs_quant": delta,
                   "fid_delta_ci_low": delta - 0.01, "fid_delta_ci_high": delta + 0.01},
        "quant": {"fid": 0.2, "kid_mean": 2.5e-3, "clip_score": 59.0},
    }
    (path / "metrics.json").write_text(json.dumps({"variants": variants, "config": config, "num_prompts": 300},
                                                  sort_keys=True))


def test_collects_every_run_with_fp_and_quant_first(tmp_path, capsys):
    _run(tmp_path / "sweep" / "0_a", "bench_unet", +0.02)     # a setting where Q-Drift hurts is listed too
    _run(tmp_path / "sweep" / "1_b", "bench_dit", -0.017)
    assert bench_table.main([str(tmp_path / "sweep")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 6
    assert [line.split(" | ")[6] for line in lines[2:]] == ["fp", "quant", "qdrift"] * 2
    assert lines[2].startswith("| bench_dit | dpmpp | 20 | svdquant_w3a4 | 5 | 300 |")
    assert "-0.0170 [-0.0270, -0.0070]" in lines[4] and "+0.0200 [+0.0100, +0.0300]" in lines[7]
    assert "| 0.0900 | 0.800 ± 0.400 | 66.00 [65.00, 67.00] | - |" in lines[2]   # KID std and CLIP CI
    assert "| 0.2000 | 2.500 | 59.00 | - |" in lines[3]                          # shown only where measured


def test_no_runs_is_an_error(tmp_path, capsys):
    assert bench_table.main([str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_deltas_view_has_one_row_per_setting(tmp_path, capsys):
    _run(tmp_path / "sweep" / "0_a", "bench_unet", +0.02)
    _run(tmp_path / "sweep" / "1_b", "bench_dit", -0.017)
    assert bench_table.main(["--deltas", str(tmp_path / "sweep")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model / sampler, steps | quant | FID fp / quant | qdrift |"
    assert lines[2] == "| bench_dit / dpmpp, 20 | svdquant_w3a4 | 0.0900 / 0.2000 | -0.0170 [-0.0270, -0.0070] |"
    assert lines[3].startswith("| bench_unet / dpmpp, 20 |") and lines[3].endswith("+0.0200 [+0.0100, +0.0300] |")


def test_deltas_view_keeps_k_when_runs_differ_in_it(tmp_path, capsys):
    """A K sweep: K becomes a column, so its rows never print alike."""
    _run(tmp_path / "sweep" / "0_a", "bench_dit", -0.01, k=1)
    _run(tmp_path / "sweep" / "1_b", "bench_dit", -0.02, k=5)
    assert bench_table.main(["--deltas", str(tmp_path / "sweep")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model / sampler, steps | quant | calib.num_runs | FID fp / quant | qdrift |"
    assert [line.split(" | ")[2] for line in lines[2:]] == ["1", "5"]
