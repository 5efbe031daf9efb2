"""experiments/tune_summary.py: a tuning sweep's trials, and whether its setting gets values of its own."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import tune_summary  # noqa: E402


def _trial(sweep: Path, job: int, scale: float, removal: float, delta: float, half: float, pool="tune",
           model="bench_unet", **choices) -> None:
    d = sweep / f"{job}_corrector.qdrift_plus.drift_scale={scale}"
    d.mkdir(parents=True)
    cfg = {"model": {"name": model}, "sampler": {"name": "euler"}, "quant": {"name": "svdquant_w3a4"},
           "eval": {"pool": pool}, "corrector": {"qdrift_plus": {"drift_scale": scale, "mean_removal": removal, **choices}}}
    variants = {"fp": {"fid": 0.005}, "quant": {"fid": 0.03},
                "qdrift_plus": {"fid": 0.03 + delta, "fid_delta_vs_quant": delta,
                                "fid_delta_ci_low": delta - half, "fid_delta_ci_high": delta + half}}
    (d / "metrics.json").write_text(json.dumps({"config": cfg, "variants": variants, "num_prompts": 300}))


def test_the_best_trial_ships_only_when_its_ci_lies_below_zero(tmp_path, capsys):
    _trial(tmp_path, 0, 1.10, 0.72, -0.002, 0.003)
    _trial(tmp_path, 1, 0.85, 0.65, -0.007, 0.004)     # best, CI [-0.011, -0.003]
    _trial(tmp_path, 10, 0.14, 0.09, -0.003, 0.001)    # below zero too, but not the best
    rows = tune_summary.trials(tmp_path, "qdrift_plus")
    assert [r["job"] for r in rows] == [0, 1, 10]      # job order, not name order
    assert tune_summary.decision(rows)["job"] == 1
    assert tune_summary.main([str(tmp_path), "--yaml"]) == 0
    entry = capsys.readouterr().out
    assert entry.startswith("  bench_unet/euler/svdquant_w3a4:") and "drift_scale: 0.85\n" in entry \
        and "mean_removal: 0.65\n" in entry
    assert tune_summary.main([str(tmp_path)]) == 0
    assert "ship trial 1" in capsys.readouterr().out


def test_a_tuned_choice_is_listed_and_shipped_with_the_numbers(tmp_path, capsys):
    _trial(tmp_path, 0, 1.10, 0.72, -0.002, 0.003, infeasible="skip")
    _trial(tmp_path, 1, 0.85, 0.65, -0.007, 0.004, infeasible="shrink")
    assert tune_summary.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| trial | drift_scale | mean_removal | infeasible |" in table and "| 1 | 0.85 | 0.65 | shrink |" in table
    tune_summary.main([str(tmp_path), "--yaml"])
    assert capsys.readouterr().out.endswith("    mean_removal: 0.65\n    infeasible: shrink\n")



def test_a_schedules_end_values_are_listed_and_shipped(tmp_path, capsys):
    """experiment=tune_qdrift_plus_sched: each trial's drift_scale_end and mean_removal_end are columns,
    and the chosen trial's entry has them."""
    _trial(tmp_path, 0, 1.10, 0.72, -0.002, 0.003, drift_scale_end=0.4, mean_removal_end=0.9, infeasible="skip")
    _trial(tmp_path, 1, 0.85, 0.65, -0.007, 0.004, drift_scale_end=1.3, mean_removal_end=0.2, infeasible="shrink")
    assert tune_summary.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| trial | drift_scale | mean_removal | drift_scale_end | mean_removal_end | infeasible |" in table
    assert "| 1 | 0.85 | 0.65 | 1.30 | 0.20 | shrink |" in table
    tune_summary.main([str(tmp_path), "--yaml"])
    assert capsys.readouterr().out.endswith("    drift_scale_end: 1.30\n    mean_removal_end: 0.20\n    infeasible: shrink\n")

def test_a_best_trial_not_told_from_noise_keeps_the_default(tmp_path, capsys):
    _trial(tmp_path, 0, 1.10, 0.72, -0.002, 0.003)
    _trial(tmp_path, 1, 0.85, 0.65, -0.004, 0.005)     # best, but its CI straddles zero
    _trial(tmp_path, 2, 0.14, 0.09, -0.001, 0.0005)    # significant, but worse than the best
    assert tune_summary.decision(tune_summary.trials(tmp_path, "qdrift_plus")) is None
    assert tune_summary.main([str(tmp_path), "--yaml"]) == 0
    assert capsys.readouterr().out == ""
    tune_summary.main([str(tmp_path)])
    assert "keep the default" in capsys.readouterr().out


def test_a_trial_without_a_finite_delta_is_left_out_not_taken_for_the_best(tmp_path, capsys):
    _trial(tmp_path, 0, 1.10, 0.72, float("nan"), 0.003)
    _trial(tmp_path, 1, 0.85, 0.65, -0.010, 0.001)
    rows = tune_summary.trials(tmp_path, "qdrift_plus")
    assert [r["job"] for r in rows] == [1] and tune_summary.decision(rows)["job"] == 1
    assert "not finite; left out" in capsys.readouterr().err


def _corrupt(p):
    (p / "0_x").mkdir()
    (p / "0_x" / "metrics.json").write_text("{not json")


def _not_a_job(p):
    _trial(p, 0, 1.0, 0.5, -0.01, 0.001)
    (p / "0_corrector.qdrift_plus.drift_scale=1.0").rename(p / "best")


@pytest.mark.parametrize("make, message", [
    (_corrupt, "0_x/metrics.json: not a finished run's metrics"),
    (_not_a_job, "best/metrics.json: invalid literal"),
    (lambda p: None, "no finished trials"),
    (lambda p: _trial(p, 0, 1.0, 0.5, -0.01, 0.001, pool="eval"), "tuning uses the tune pool only"),
    (lambda p: (_trial(p, 0, 1.0, 0.5, -0.01, 0.001), _trial(p, 1, 1.0, 0.5, -0.01, 0.001, model="bench_dit")),
     "trials of several settings"),
])
def test_what_is_not_one_tuning_sweep_is_refused(tmp_path, capsys, make, message):
    make(tmp_path)
    assert tune_summary.main([str(tmp_path)]) == 2
    assert message in capsys.readouterr().err



def test_a_study_resumed_over_several_sweeps_is_numbered_on(tmp_path, capsys):
    """hydra.sweeper.storage keeps one Optuna study over several calls, each in a sweep folder of its own
    whose jobs start at 0 again: the summary numbers them on and picks the best of all."""
    _trial(tmp_path / "c0", 0, 1.10, 0.72, -0.002, 0.003)
    _trial(tmp_path / "c0", 1, 0.90, 0.70, -0.004, 0.003)
    _trial(tmp_path / "c1", 0, 0.85, 0.65, -0.007, 0.004)
    rows = tune_summary.trials([tmp_path / "c0", tmp_path / "c1"], "qdrift_plus")
    assert [r["job"] for r in rows] == [0, 1, 2]
    assert tune_summary.main([str(tmp_path / "c0"), str(tmp_path / "c1")]) == 0
    assert "ship trial 2" in capsys.readouterr().out



def test_a_resumed_study_is_numbered_as_optuna_numbers_it_and_checked(tmp_path, capsys):
    """A call cut off in a trial leaves a job folder without results: the next call's trials come after it.
    A missing folder, another prompt count or another set of tuned values is refused, not summarised."""
    _trial(tmp_path / "c0", 0, 1.10, 0.72, -0.002, 0.003)
    (tmp_path / "c0" / "1_corrector.qdrift_plus.drift_scale=0.5").mkdir()      # killed at the deadline
    _trial(tmp_path / "c1", 0, 0.85, 0.65, -0.007, 0.004)
    (tmp_path / "c2").mkdir()
    rows = tune_summary.trials([tmp_path / "c0", tmp_path / "c2", tmp_path / "c1", tmp_path / "c0"], "qdrift_plus")
    assert [r["job"] for r in rows] == [0, 2]
    assert "c2: no finished trial" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a sweep folder"):
        tune_summary.trials([tmp_path / "c0", tmp_path / "typo"], "qdrift_plus")
    m = tmp_path / "c1" / "0_corrector.qdrift_plus.drift_scale=0.85" / "metrics.json"
    other = json.loads(m.read_text())
    other["num_prompts"] = 1000
    m.write_text(json.dumps(other))
    with pytest.raises(ValueError, match="prompt counts"):
        tune_summary.trials([tmp_path / "c0", tmp_path / "c1"], "qdrift_plus")
    _trial(tmp_path / "c3", 0, 0.85, 0.65, -0.007, 0.004, drift_scale_end=1.2)
    with pytest.raises(ValueError, match="tune different values"):
        tune_summary.trials([tmp_path / "c0", tmp_path / "c3"], "qdrift_plus")
