"""experiments/bench_table.py: run directories -> one markdown row per setting and variant."""
import importlib.util
import json
from pathlib import Path

import pytest

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


# --- replicates -----------------------------------------------------------------------------------

def _replicate(path: Path, r: int, delta: float, model: str = "bench_dit", rerun: bool = False) -> None:
    """Run r of `python run.py -m replicate=0,1`: FP 0.1, quantized 0.2, corrected 0.2 + delta."""
    path.mkdir(parents=True)
    config = {"model": {"name": model}, "sampler": {"name": "dpmpp", "steps": 20}, "replicate": r,
              "seed": r * 10_000_000, "quant": {"name": "svdquant_w3a4", "seed": r},
              "calib": {"num_runs": 5, "seed": 1_000_000 + r * 10_000_000}, "eval": {"split": r}}
    variants = {"fp": {"fid": 0.1}, "quant": {"fid": 0.2},
                "qdrift": {"fid": 0.2 + delta, "fid_delta_vs_quant": delta, "fid_delta_ci_low": delta - 0.01,
                           "fid_delta_ci_high": delta + 0.01}}
    (path / "metrics.json").write_text(json.dumps({"variants": variants, "config": config, "num_prompts": 300}))
    (path / ".hydra").mkdir()
    (path / ".hydra" / "overrides.yaml").write_text(f"- replicate={r}\n- model={model}\n")


def test_deltas_view_aggregates_replicates_with_a_t_interval(tmp_path, capsys):
    from scipy import stats

    _replicate(tmp_path / "sweep" / "0_a", 0, -0.02)
    _replicate(tmp_path / "sweep" / "1_b", 1, -0.04)
    _replicate(tmp_path / "other" / "0_a", 0, +0.01, model="bench_unet")   # one replicate: no interval
    assert bench_table.main(["--deltas", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == ("| model.name | sampler.name | sampler.steps | quant.name | calib.num_runs | replicates | fp FID "
                        "| quant FID | qdrift FID delta [95% t-CI] | qdrift gap recovered [95% t-CI] |")
    assert len(lines) == 2 + 2
    dit = next(line for line in lines if "bench_dit" in line)
    half = stats.t.ppf(0.975, 1) * 0.02 / 2 ** 0.5 / 2 ** 0.5   # sd of (-0.02, -0.04) / sqrt(2)
    assert half == pytest.approx(0.12706, abs=1e-4)
    assert f"| 2 | 0.1000 | 0.2000 | -0.0300 [{-0.03 - half:+.4f}, {-0.03 + half:+.4f}] |" in dit
    assert "| +30 % [-97, +157] |" in dit        # gaps 20 % and 40 %
    unet = next(line for line in lines if "bench_unet" in line)
    assert unet.endswith("| 1 | 0.1000 | 0.2000 | +0.0100 | -10 % |")


def test_per_replicate_rows_show_each_paired_ci(tmp_path, capsys):
    _replicate(tmp_path / "sweep" / "0_a", 0, -0.02)
    _replicate(tmp_path / "sweep" / "1_b", 1, -0.04)
    assert bench_table.main(["--deltas", "--per-replicate", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 3
    assert "replicate=0 quant.seed=0 eval.split=0 seed=0 calib.seed=1000000 |" in lines[3]
    assert "| -0.0200 [-0.0300, -0.0100] (paired) | +20 % [+10, +30] (paired) |" in lines[3]
    assert "replicate=1 quant.seed=1 eval.split=1 seed=10000000 calib.seed=11000000 |" in lines[4]


def test_one_replicate_twice_with_other_results_is_refused(tmp_path, capsys):
    _replicate(tmp_path / "sweep" / "0_a", 0, -0.02)
    _replicate(tmp_path / "sweep" / "1_b", 1, -0.04)
    _replicate(tmp_path / "again" / "0_a", 1, -0.03)
    assert bench_table.main(["--deltas", str(tmp_path)]) == 2
    assert "are the same replicate of one setting" in capsys.readouterr().err


def test_a_resumed_sweeps_rerun_of_a_replicate_counts_once(tmp_path, capsys):
    """A sweep resumed with fewer jobs reruns a finished job from the cache under another job number:
    the same replicate with the same results, one replicate in the table."""
    _replicate(tmp_path / "sweep" / "0_a", 0, -0.02)
    _replicate(tmp_path / "sweep" / "1_b", 1, -0.04)
    _replicate(tmp_path / "sweep" / "0_b", 1, -0.04)
    assert bench_table.main(["--deltas", str(tmp_path)]) == 0
    dit = next(line for line in capsys.readouterr().out.splitlines() if "bench_dit" in line)
    assert "| 2 | 0.1000 | 0.2000 | -0.0300 [" in dit


def test_runs_without_replicates_keep_the_plain_view(tmp_path):
    from qdrift.report import has_replicates, load_runs

    _run(tmp_path / "sweep" / "0_a", "bench_unet", +0.02)
    _run(tmp_path / "sweep" / "1_b", "bench_dit", -0.017)
    assert not has_replicates(load_runs([tmp_path]))


def test_report_has_the_table_over_replicates(tmp_path):
    from qdrift.report import main as report_main

    _replicate(tmp_path / "sweep" / "0_a", 0, -0.02)
    _replicate(tmp_path / "sweep" / "1_b", 1, -0.04)
    assert report_main([str(tmp_path / "sweep"), "--out", str(tmp_path / "r.html"), "--per-replicate"]) == 0
    table = (tmp_path / "r.replicates.md").read_text()
    assert "| 2 | 0.1000 | 0.2000 | -0.0300 [-0.1571, +0.0971] | +30 % [-97, +157] |" in table
    assert table.count("(paired)") == 4
    assert "Over replicates" in (tmp_path / "r.html").read_text()


def test_gaps_view_marks_what_replicates(tmp_path, capsys):
    """--gaps: one cell per corrector, bold where the FID delta's t-interval over replicates is below zero,
    "(worse)" where above; one replicate prints its mean alone and marks nothing."""
    for r, delta in enumerate((-0.02, -0.04, -0.03)):
        _replicate(tmp_path / "a" / f"{r}_x", r, delta)
    for r, delta in enumerate((0.020, 0.021, 0.022)):
        _replicate(tmp_path / "b" / f"{r}_x", r, delta, model="bench_unet")
    for r, delta in enumerate((0.01, -0.03)):
        _replicate(tmp_path / "d" / f"{r}_x", r, delta, model="bench_tiny")
    _replicate(tmp_path / "c" / "0_x", 0, -0.05, model="bench_flow")
    assert bench_table.main(["--gaps", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model / sampler, steps | quant | replicates | FID fp / quant | qdrift |"
    row = {line.split(" / ")[0].strip("| "): line for line in lines[2:]}
    assert row["bench_dit"].endswith("| 3 | 0.1000 / 0.2000 | **+30 % [+5, +55]** |")
    assert row["bench_unet"].endswith("| 3 | 0.1000 / 0.2000 | -21 % [-23, -19] (worse) |")
    assert row["bench_tiny"].endswith("| 2 | 0.1000 / 0.2000 | +10 % [-244, +264] |")   # CI spans zero
    assert row["bench_flow"].endswith("| 1 | 0.1000 / 0.2000 | +50 % |")


def _with_peer(path: Path, r: int, delta: float, peer_delta: float, model: str = "bench_dit") -> None:
    """A replicate that also ran the peer `ptqd` (FID 0.2 + peer_delta)."""
    _replicate(path, r, delta, model=model)
    m = json.loads((path / "metrics.json").read_text())
    m["variants"]["ptqd"] = {"fid": 0.2 + peer_delta, "fid_delta_vs_quant": peer_delta,
                             "fid_delta_ci_low": peer_delta - 0.01, "fid_delta_ci_high": peer_delta + 0.01}
    (path / "metrics.json").write_text(json.dumps(m))


def test_versus_compares_two_correctors_paired_by_replicate(tmp_path, capsys):
    """--versus: the gap difference over replicates, paired, so a PTQ draw that moves both alike cancels;
    bold where the corrector's FID is significantly below the peer's, "(behind)" where above."""
    from scipy import stats

    # Q-Drift is ahead by 0.010, 0.012, 0.011 of FID although its own delta varies widely between draws.
    for r, (d, p) in enumerate(((-0.030, -0.020), (-0.062, -0.050), (-0.001, +0.010))):
        _with_peer(tmp_path / "a" / f"{r}_x", r, d, p)
    for r, (d, p) in enumerate(((-0.010, -0.030), (-0.011, -0.032), (-0.012, -0.031))):
        _with_peer(tmp_path / "b" / f"{r}_x", r, d, p, model="bench_unet")
    assert bench_table.main(["--versus", "qdrift", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| model / sampler, steps | quant | replicates | qdrift - ptqd |"
    row = {line.split(" / ")[0].strip("| "): line for line in lines[2:]}
    diffs = [0.10, 0.12, 0.11]                  # gap differences (FID gap 0.1)
    half = stats.t.ppf(0.975, 2) * stats.tstd(diffs) / 3 ** 0.5
    assert row["bench_dit"].endswith(f"| 3 | **+11 pp [{100 * (0.11 - half):+.0f}, {100 * (0.11 + half):+.0f}]** |")
    assert row["bench_unet"].endswith("(behind) |") and "| -20 pp [" in row["bench_unet"]
    # The unpaired view would not call the dit setting: each corrector's own interval is wide.
    assert bench_table.main(["--gaps", str(tmp_path)]) == 0
    dit = next(line for line in capsys.readouterr().out.splitlines() if "bench_dit" in line)
    assert "**" not in dit


def _pair(path: Path, r: int, quant: float, ref: float | None, peer: float | None) -> None:
    """A replicate with FP 0.1, the given quantized FID, and Q-Drift's and PTQD's FIDs (None: not run)."""
    _replicate(path, r, 0.0)
    m = json.loads((path / "metrics.json").read_text())
    m["variants"] = {"fp": {"fid": 0.1}, "quant": {"fid": quant}}
    for name, fid in (("qdrift", ref), ("ptqd", peer)):
        if fid is not None:
            m["variants"][name] = {"fid": fid, "fid_delta_vs_quant": fid - quant,
                                   "fid_delta_ci_low": fid - quant - 0.01, "fid_delta_ci_high": fid - quant + 0.01}
    (path / "metrics.json").write_text(json.dumps(m))


def test_versus_marks_only_where_the_printed_interval_agrees(tmp_path, capsys):
    """The FID difference is significant in every setting below, but where the replicates' FP-quantized
    gaps differ widely the gap difference's interval (the one printed) spans zero: no bold there."""
    for r, gap in enumerate((0.1, 0.01, 1.0)):   # ref 0.010-0.012 below the peer in FID each time
        _pair(tmp_path / "wide" / f"{r}_x", r, 0.1 + gap, 0.1 + gap / 2 - 0.010 - r / 1000, 0.1 + gap / 2)
    assert bench_table.main(["--versus", "qdrift", str(tmp_path)]) == 0
    cell = capsys.readouterr().out.strip().splitlines()[-1].split(" | ")[-1]
    low = float(cell.split("[")[1].split(",")[0])
    assert low < 0 and "**" not in cell and "behind" not in cell


def test_versus_counts_the_replicates_it_pairs(tmp_path, capsys):
    """A replicate without the peer, or with a non-finite FID, is left out of the pairs and the cell
    says over how many it ran; a setting without any pair prints "-"."""
    _pair(tmp_path / "a" / "0_x", 0, 0.2, 0.15, 0.17)
    _pair(tmp_path / "a" / "1_x", 1, 0.2, 0.16, 0.18)
    _pair(tmp_path / "a" / "2_x", 2, 0.2, 0.15, None)           # the peer did not run
    _pair(tmp_path / "a" / "3_x", 3, 0.2, float("nan"), 0.18)   # a broken FID
    _pair(tmp_path / "b" / "0_x", 0, 0.3, 0.25, None)
    _pair(tmp_path / "b" / "1_x", 1, 0.3, 0.25, None)
    for d in ("b/0_x", "b/1_x"):                                # another setting: bench_unet
        m = json.loads((tmp_path / d / "metrics.json").read_text())
        m["config"]["model"]["name"] = "bench_unet"
        (tmp_path / d / "metrics.json").write_text(json.dumps(m))
        (tmp_path / d / ".hydra" / "overrides.yaml").write_text(f"- replicate={d[2]}\n- model=bench_unet\n")
    assert bench_table.main(["--versus", "qdrift", str(tmp_path)]) == 0
    row = {line.split(" / ")[0].strip("| "): line for line in capsys.readouterr().out.strip().splitlines()[2:]}
    assert row["bench_dit"].endswith("| 4 | **+20 pp [+20, +20] (n=2)** |")   # differences 0.02 and 0.02 of a 0.1 gap
    assert row["bench_unet"].endswith("| 2 | - |")


def test_versus_refuses_what_it_cannot_compare(tmp_path, capsys):
    _pair(tmp_path / "a" / "0_x", 0, 0.2, 0.15, 0.17)
    _pair(tmp_path / "a" / "1_x", 1, 0.2, 0.16, 0.18)
    for args, match in ((["--versus", "fp"], "no run has the corrector 'fp'"),
                        (["--versus", "qdrift", "--gaps"], "a view of its own"),
                        (["--versus", "qdrift", "--per-replicate"], "a view of its own")):
        assert bench_table.main([*args, str(tmp_path)]) == 2
        assert match in capsys.readouterr().err
    _pair(tmp_path / "only" / "0_x", 0, 0.2, 0.15, None)
    _pair(tmp_path / "only" / "1_x", 1, 0.2, 0.16, None)
    assert bench_table.main(["--versus", "qdrift", str(tmp_path / "only")]) == 2
    assert "no corrector besides 'qdrift'" in capsys.readouterr().err


def test_versus_needs_the_corrector_and_replicates(tmp_path, capsys):
    _with_peer(tmp_path / "a" / "0_x", 0, -0.03, -0.02)
    _with_peer(tmp_path / "a" / "1_x", 1, -0.03, -0.02)
    assert bench_table.main(["--versus", "d2dpm", str(tmp_path)]) == 2
    assert "no run has the corrector 'd2dpm'" in capsys.readouterr().err
    _run(tmp_path / "plain" / "0_a", "bench_unet", +0.02)
    assert bench_table.main(["--versus", "qdrift", str(tmp_path / "plain")]) == 2
    assert "these runs have none" in capsys.readouterr().err


def _add_corrector(path: Path, r: int, name: str, delta: float, quant_fid: float = 0.2,
                   corrector: str | None = None) -> None:
    """The same replicate as _replicate's run r, made again later with only another corrector."""
    _replicate(path, r, 0.0)
    metrics = json.loads((path / "metrics.json").read_text())
    metrics["variants"] = {"fp": {"fid": 0.1}, "quant": {"fid": quant_fid},
                           name: {"fid": quant_fid + delta, "fid_delta_vs_quant": delta,
                                  "fid_delta_ci_low": delta - 0.01, "fid_delta_ci_high": delta + 0.01}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    if corrector:
        (path / ".hydra" / "overrides.yaml").write_text(f"- replicate={r}\n- model=bench_dit\n- corrector={corrector}\n")


@pytest.mark.parametrize("corrector", [None, "[late]"])
def test_a_corrector_run_later_on_the_same_replicates_joins_their_rows(tmp_path, capsys, corrector):
    """A corrector added to a finished table (another sweep, another machine): its runs are the same
    replicates (FP and quantized agree to rounding), so each joins its replicate's row; the table is as
    if one run had made every corrector."""
    _replicate(tmp_path / "sweep" / "0_a", 0, -0.02)
    _replicate(tmp_path / "sweep" / "1_b", 1, -0.04)
    _add_corrector(tmp_path / "later" / "0_a", 0, "late", -0.06, quant_fid=0.2 * (1 + 1e-9), corrector=corrector)
    _add_corrector(tmp_path / "later" / "1_b", 1, "late", -0.08, corrector=corrector)
    assert bench_table.main(["--deltas", "--gaps", str(tmp_path)]) == 0
    out = capsys.readouterr()
    rows = [line for line in out.out.splitlines() if "bench_dit" in line]
    assert len(rows) == 1 and rows[0].endswith("| 2 | 0.1000 / 0.2000 | +30 % [-97, +157] | +70 % [-57, +197] |")
    assert out.err.count("(FP and quantized metrics agree): its ") == 2
    assert bench_table.main(["--versus", "late", str(tmp_path)]) == 0
    assert "| **+40 pp [+40, +40]** |" in capsys.readouterr().out        # paired: 60-20 and 80-40


def test_a_later_corrector_on_another_quantized_model_is_not_joined(tmp_path, capsys):
    """Other quantized metrics mean another draw (another PTQ result, other prompts): not the same
    replicate's row. With the same corrector option it is refused; with another it keeps its own row."""
    _replicate(tmp_path / "sweep" / "0_a", 0, -0.02)
    _add_corrector(tmp_path / "later" / "0_a", 0, "late", -0.06, quant_fid=0.21)
    assert bench_table.main(["--deltas", str(tmp_path)]) == 2
    assert "same replicate of one setting" in capsys.readouterr().err
    (tmp_path / "later" / "0_a" / ".hydra" / "overrides.yaml").write_text("- replicate=0\n- model=bench_dit\n- corrector=late\n")
    assert bench_table.main(["--deltas", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "joined" not in out.err and len([line for line in out.out.splitlines() if "bench_dit" in line]) == 2


def test_a_later_run_whose_shared_corrector_differs_is_refused(tmp_path, capsys):
    _replicate(tmp_path / "sweep" / "0_a", 0, -0.02)
    _add_corrector(tmp_path / "later" / "0_a", 0, "qdrift", -0.03)       # same name, other result
    assert bench_table.main(["--deltas", str(tmp_path)]) == 2
    assert "same replicate of one setting" in capsys.readouterr().err



def _overrides(path: Path, r: int, corrector: str, extra: str = "") -> None:
    (path / ".hydra" / "overrides.yaml").write_text(f"- replicate={r}\n- model=bench_dit\n- corrector={corrector}\n{extra}")


def test_joining_does_not_depend_on_which_run_sorts_first_nor_on_a_missing_partner(tmp_path, capsys):
    """The later sweep's job folders sort before or after the first sweep's, and one replicate has no later
    run (its sweep hit the deadline): still one row per setting, the later corrector over the replicates
    it ran; a batch size of its own (no number depends on it) changes nothing."""
    for r, first, late in ((0, "b_all", "a_late"), (1, "a_all", "b_late"), (2, "a_all", None)):
        _replicate(tmp_path / f"r{r}" / first, r, -0.02)
        _overrides(tmp_path / f"r{r}" / first, r, "all")
        if late:
            _add_corrector(tmp_path / f"r{r}" / late, r, "late", -0.06 - 0.01 * r)
            _overrides(tmp_path / f"r{r}" / late, r, "[late]", "- batch_size=100\n")
    assert bench_table.main(["--deltas", "--gaps", str(tmp_path)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "bench_dit" in line]
    assert len(rows) == 1 and rows[0].endswith("| 3 | 0.1000 / 0.2000 | **+20 % [+20, +20]** | **+65 % [+1, +129]** |")
    assert bench_table.main(["--versus", "late", str(tmp_path)]) == 0
    assert "(n=2)" in capsys.readouterr().out


def test_one_replicate_with_a_joined_corrector_shows_it(tmp_path, capsys):
    _replicate(tmp_path / "sweep" / "0", 0, -0.02)
    _add_corrector(tmp_path / "later" / "0", 0, "late", -0.06, corrector="[late]")
    assert bench_table.main(["--deltas", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("| -0.0200 [-0.0300, -0.0100] | -0.0600 [-0.0700, -0.0500] |")


def test_a_rerun_that_contradicts_a_joined_corrector_is_refused(tmp_path, capsys):
    _replicate(tmp_path / "a" / "0", 0, -0.02)
    _add_corrector(tmp_path / "b" / "0", 0, "late", -0.06, corrector="[late]")
    _add_corrector(tmp_path / "c" / "0", 0, "late", +0.09, corrector="[late]")    # same option, other result
    assert bench_table.main(["--deltas", str(tmp_path)]) == 2
    assert "b/0 and " in capsys.readouterr().err


def test_a_run_whose_config_differs_beyond_its_correctors_is_not_joined(tmp_path, capsys):
    """Equal FP and quantized metrics are not enough: a calibration setting that differs only in the config
    (a local default) would make the joined corrector another experiment."""
    _replicate(tmp_path / "a" / "0", 0, -0.02)
    _add_corrector(tmp_path / "b" / "0", 0, "late", -0.06)
    metrics = json.loads((tmp_path / "b" / "0" / "metrics.json").read_text())
    metrics["config"]["calib"]["trim_std"] = 3.0
    (tmp_path / "b" / "0" / "metrics.json").write_text(json.dumps(metrics))
    assert bench_table.main(["--deltas", str(tmp_path)]) == 2
    assert "same replicate of one setting" in capsys.readouterr().err
