"""Q-Drift+ (README, "Beyond the paper"): the exact rule landing as close as it can at infeasible steps,
mean-error removal, their validation, the tune prompt pool and the run's Optuna objective."""
from __future__ import annotations

import pytest
import torch

from qdrift.config import ConfigError, validate
from qdrift.drift import CalibrationPool, make_corrector, testbed
from qdrift.drift.rules import _levels, coefficients, feasible_steps, schedule_of, x0_variance
from qdrift.drift.statistics import DriftStatistics
from qdrift.prompts import TUNE_EXCLUDE, BenchPrompts, prompt_set, tune_captions

from .conftest import compose_cfg
from .test_correctors import gaussian_stats, linear_error, pool_of


def _landing(kind: str, V: float, infeasible: str, steps: int = 20):
    """(sigma' each step lands on, sigma_n, W, feasible) for a constant residual variance V."""
    sch = testbed.scheduler_for(kind)
    sch.set_timesteps(steps)
    schedule = schedule_of(sch)
    Vt = torch.full((steps, 1), V, dtype=torch.float64)
    coef = coefficients(schedule, Vt, "exact", infeasible)
    a_i, s_i, a_n, s_n = _levels(schedule)
    k = (coef.p - 1) / -a_i                                    # p = 1 - k a_i
    s_new = s_n + k * (a_n * s_i - a_i * s_n)
    W = x0_variance(schedule, Vt)
    rho = a_i / s_i
    feasible = s_n**2 * (1 + rho**2 * W) - a_n**2 * W >= 0
    return s_new, s_n, W, feasible, a_n, rho


@pytest.mark.parametrize("kind", ["dpmpp", "ddim"])
def test_closest_lands_at_the_smallest_reachable_variance_where_exact_skips(kind):
    s_new, s_n, W, feasible, a_n, rho = _landing(kind, 0.5, "closest")
    skip, *_ = _landing(kind, 0.5, "skip")
    assert (~feasible).any() and feasible.any()                # the regime where the two differ
    assert torch.allclose(s_new[feasible], skip[feasible])     # feasible steps: the exact rule itself
    assert torch.equal(skip[~feasible], s_n[~feasible])        # exact skips the others ...
    total = lambda s: s**2 + (a_n - s * rho) ** 2 * W          # noqa: E731 - variance x_n ends with
    closest = total(s_new)[~feasible]
    assert (closest < total(s_n)[~feasible]).all()             # ... closest lands nearer to sigma_n^2
    assert (closest >= (s_n**2)[~feasible] - 1e-12).all()      # without undershooting it
    for shift in (-1e-3, 1e-3):                                # and no sigma' does better
        assert (total(s_new + shift)[~feasible] >= closest).all()


@pytest.mark.parametrize("kind", ["dpmpp", "ddim", "euler", "euler_a", "flow_euler"])
def test_paper_rule_on_feasible_steps_only_is_the_paper_rule_elsewhere(kind):
    """The ablation `infeasible=feasible_only` of the paper rule: unchanged on the steps the exact rule
    acts on, the plain sampler on the others."""
    sch = testbed.scheduler_for(kind)
    sch.set_timesteps(20)
    schedule = schedule_of(sch)
    V = torch.linspace(0.01, 2.0, 20, dtype=torch.float64).unsqueeze(-1) ** 2    # growing late, as measured
    paper, ablation = coefficients(schedule, V, "paper"), coefficients(schedule, V, "paper", "feasible_only")
    keep = feasible_steps(schedule, V)
    assert keep.any() and (~keep).any()                       # the regime where the two differ
    exact = coefficients(schedule, V, "exact")
    acts = (exact.out != 1) if kind == "euler_a" else (exact.p != 1) | (exact.q != 0)
    assert torch.equal(keep, acts)                            # exactly the steps the exact rule corrects
    for name in ("p", "q", "out"):
        a, b = getattr(ablation, name), getattr(paper, name)
        assert torch.equal(a[keep], b[keep])                  # there: the paper rule itself
        assert (a[~keep] == (0 if name == "q" else 1)).all()  # elsewhere: the plain sampler
    moved = (paper.out if kind == "euler_a" else paper.p)[~keep]
    assert (moved != 1).any()                                 # where the paper rule does act


@pytest.mark.parametrize("kind", ["dpmpp", "flow_euler", "euler", "euler_a"])
def test_shrink_removes_the_slope_of_e_given_u_only_where_no_sigma_is_exact(kind):
    """`infeasible=shrink`: the exact rule's steps and coefficients as with `skip`; on the output, at the
    infeasible steps and channels only, E[e | u]'s slope (pooled over channels) comes off; the mean
    removal stays per channel, as everywhere."""
    # u = u_fp + e, e independent of u_fp with variance r growing late, differently per channel.
    r = torch.linspace(0.1, 2.0, 20, dtype=torch.float64).unsqueeze(-1) ** 2 * torch.tensor([1.0, 1.0, 0.5, 0.2])
    full = lambda v: torch.as_tensor(v, dtype=torch.float64).expand(20, 4).clone()   # noqa: E731
    rs = r.mean(1, keepdim=True)                                  # the fit pooled over channels
    pooled = DriftStatistics(torch.full((20, 1), 0.3, dtype=torch.float64), torch.full((20, 1), 0.04, dtype=torch.float64),
                             1.2 + rs, rs, 0.9 * rs)
    stats = DriftStatistics(full(0.2), full([0.2, -0.1, 0.05, 0.0]), 1 + r, r, r.clone(), pooling="channel",
                            mu_e_se=full(1e-3), pooled=pooled)
    sch = testbed.scheduler_for(kind)
    sch.set_timesteps(20)
    plain = make_corrector("qdrift", stats, mode="exact", infeasible="skip", mean_removal=0.3)
    shrink = make_corrector("qdrift", stats, mode="exact", infeasible="shrink", mean_removal=0.3)
    plain.prepare(sch), shrink.prepare(sch)
    for name in ("p", "q", "out"):
        assert torch.equal(getattr(plain.coef, name), getattr(shrink.coef, name))   # same drift everywhere
    where = ~feasible_steps(schedule_of(sch), stats.residual_var)
    assert where.any() and (~where).any() and not where.all(dim=1).equal(where.any(dim=1))  # some steps in part
    u = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    for i in range(20):
        a, b = plain.transform_output(i, u), shrink.transform_output(i, u)
        slope, mu_u = pooled.regression_slope[i].float(), pooled.mu_u[i].float()   # one slope per step
        expected = a - where[i].view(1, 4, 1) * slope * (u - mu_u)
        assert torch.allclose(b, expected, atol=1e-6)
        assert torch.equal(a[:, ~where[i]], b[:, ~where[i]])      # feasible channels: untouched, bit for bit
    # shrink_strength scales that slope and nothing else: 0 is `skip`, 2 removes twice the shrink.
    for strength in (0.0, 2.0):
        scaled = make_corrector("qdrift", stats, mode="exact", infeasible="shrink", mean_removal=0.3,
                                shrink_strength=strength)
        scaled.prepare(sch)
        assert torch.equal(scaled.coef.p, plain.coef.p) and torch.equal(scaled.coef.out, plain.coef.out)
        for i in range(20):
            a, b, c = plain.transform_output(i, u), shrink.transform_output(i, u), scaled.transform_output(i, u)
            assert torch.allclose(c, a + strength * (b - a), atol=1e-6)
    # shrink_centre=channel: the same slope, toward each channel's own mean output.
    centred = make_corrector("qdrift", stats, mode="exact", infeasible="shrink", mean_removal=0.3,
                             shrink_centre="channel")
    centred.prepare(sch)
    for i in range(20):
        a, c = plain.transform_output(i, u), centred.transform_output(i, u)
        slope = pooled.regression_slope[i].float()
        expected = a - where[i].view(1, 4, 1) * slope * (u - stats.mu_u[i].float().view(1, 4, 1))
        assert torch.allclose(c, expected, atol=1e-6)


def test_qdrift_plus_shrink_runs_through_the_runner_and_differs_only_by_its_last_steps(run_tiny):
    """corrector=qdrift_plus_shrink: Q-Drift+'s tuned values with infeasible=shrink. The last step (sigma_n
    = 0) is never feasible, so its images differ from Q-Drift+'s."""
    import numpy as np
    from PIL import Image

    metrics, run_dir = run_tiny(["corrector=[qdrift_plus,qdrift_plus_shrink]"])
    cfg = metrics["config"]["corrector"]
    assert cfg["qdrift_plus_shrink"] == {**cfg["qdrift_plus"], "infeasible": "shrink"}
    assert {"qdrift_plus", "qdrift_plus_shrink"} <= set(metrics["variants"])
    pick = lambda v: np.asarray(Image.open(run_dir / "images" / v / "0.png"), dtype=np.int16)   # noqa: E731
    assert np.abs(pick("qdrift_plus") - pick("qdrift_plus_shrink")).max() > 0


def test_shrink_leaves_ddim_with_its_own_noise_alone():
    """DDIM with eta > 0 runs no drift rule, so no infeasible-step choice either: mean removal only."""
    from types import SimpleNamespace

    stats = gaussian_stats(s_ee=8.0, s_ue=0.8, steps=10)
    sch = testbed.scheduler_for("ddim")
    sch.set_timesteps(10)
    shrink = make_corrector("qdrift", stats, mode="exact", infeasible="shrink", mean_removal=0.5)
    plain = make_corrector("qdrift", stats, mode="exact", infeasible="skip", mean_removal=0.5)
    shrink.prepare(sch), plain.prepare(sch)
    last = int(shrink.shrink.abs().sum(1).nonzero().max())      # an infeasible step
    seen = []
    parent = lambda u, **kw: seen.append(u) or SimpleNamespace(prev_sample=u)   # noqa: E731
    u, x = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for eta in (0.0, 0.5):
        shrink.step(sch, last, u, x, parent, {"eta": eta})
    assert not torch.equal(seen[0], plain.transform_output(last, u))           # eta = 0: shrunk
    assert torch.equal(seen[1], plain.transform_output(last, u))               # eta > 0: mean removal only


def test_shrink_is_refused_with_bias_removal_and_by_the_paper_rule():
    with pytest.raises(ValueError, match="adds nothing"):
        make_corrector("qdrift", gaussian_stats(), mode="exact", infeasible="shrink", bias_removal=True)
    with pytest.raises(ValueError, match="not a choice of the paper rule"):
        make_corrector("qdrift", gaussian_stats(), mode="paper", infeasible="shrink")
    with pytest.raises(ValueError, match="shrink_strength scales"):
        make_corrector("qdrift", gaussian_stats(), mode="exact", infeasible="skip", shrink_strength=1.5)
    with pytest.raises(ValueError, match="shrink_strength scales"):
        make_corrector("qdrift", gaussian_stats(), mode="exact", infeasible="shrink", shrink_strength=-0.5)
    with pytest.raises(ValueError, match="shrink_centre is where"):
        make_corrector("qdrift", gaussian_stats(), mode="exact", infeasible="skip", shrink_centre="channel")
    with pytest.raises(ValueError, match="shrink_centre is where"):
        make_corrector("qdrift", gaussian_stats(), mode="exact", infeasible="shrink", shrink_centre="median")
    for bad in (float("nan"), True, "2"):
        with pytest.raises(ValueError, match="shrink_strength scales"):
            make_corrector("qdrift", gaussian_stats(), mode="exact", infeasible="shrink", shrink_strength=bad)


def test_mean_removal_subtracts_that_fraction_of_the_resolved_mean_error_per_channel():
    u_fp, e = linear_error(0.0, [0.2, -0.1, 0.05, 0.0], noise=0.05)
    stats = pool_of(u_fp + e, e).fit(5, "channel")
    shrunk = stats.shrunk_mean_error()
    assert torch.allclose(shrunk[0, :3], stats.mu_e[0, :3], rtol=1e-3)   # resolved means stay
    assert shrunk[0, 3].abs() < 0.5 * stats.mu_e[0, 3].abs()              # an unresolved one mostly goes
    u = (u_fp + e)[:1].float()
    half = make_corrector("qdrift", stats, mode="exact", mean_removal=0.5).transform_output(0, u)
    assert torch.allclose(half, u - 0.5 * shrunk.float().view(1, 4, 1))
    assert make_corrector("qdrift", stats).transform_output(0, u) is u   # the paper's rule is unchanged



@pytest.mark.parametrize("kind", ["dpmpp", "flow_euler"])
def test_a_drift_scale_schedule_runs_from_its_first_to_its_last_steps_value(kind):
    """drift_scale_end: step i's change from the identity is scaled by drift_scale + (end - drift_scale)
    i / (S - 1); an end equal to the start is the constant scale, to the last bit."""
    steps = 20
    sch = testbed.scheduler_for(kind)
    sch.set_timesteps(steps)
    schedule = schedule_of(sch)
    stats = gaussian_stats(s_ee=0.05, s_ue=0.0, steps=steps)
    unscaled = coefficients(schedule, stats.residual_var, "exact", "skip")
    ramp = make_corrector("qdrift", stats, mode="exact", drift_scale=0.5, drift_scale_end=1.5).step_coefficients(schedule)
    changed = (unscaled.p - 1).abs() > 1e-6
    assert changed.sum() > 3                                           # steps the rule moves
    scale = (ramp.p - 1)[changed] / (unscaled.p - 1)[changed]
    expected = torch.linspace(0.5, 1.5, steps, dtype=torch.float64)[:, None].expand_as(changed)[changed]
    assert torch.allclose(scale, expected)
    same = make_corrector("qdrift", stats, mode="exact", drift_scale=0.7, drift_scale_end=0.7).step_coefficients(schedule)
    const = make_corrector("qdrift", stats, mode="exact", drift_scale=0.7).step_coefficients(schedule)
    assert all(torch.equal(getattr(same, f), getattr(const, f)) for f in ("p", "q", "out"))


def test_a_mean_removal_schedule_removes_its_first_steps_share_first_and_its_end_value_last():
    u_fp, e = linear_error(0.0, [0.2, -0.1, 0.05, 0.0], noise=0.05)
    step = pool_of(u_fp + e, e)                                      # the same pool at each of 3 steps
    stats = CalibrationPool(torch.cat([step.scalar] * 3, 1), torch.cat([step.channel] * 3, 1)).fit(5, "channel")
    assert stats.num_steps == 3
    shrunk = stats.shrunk_mean_error().float()
    ramp = make_corrector("qdrift", stats, mode="exact", mean_removal=0.0, mean_removal_end=1.0)
    u = (u_fp + e)[:1].float()
    for i, share in enumerate((0.0, 0.5, 1.0)):
        assert torch.allclose(ramp.transform_output(i, u), u - share * shrunk[i].view(1, 4, 1))
    assert ramp.transform_output(0, u) is u                            # nothing removed at a zero share


@pytest.mark.parametrize("options, match", [
    (dict(drift_scale_end=-0.5), "drift_scale_end is a finite number >= 0"),
    (dict(drift_scale_end=float("nan")), "drift_scale_end is a finite number >= 0"),
    (dict(drift_scale_end=True), "drift_scale_end is a finite number >= 0"),
    (dict(mean_removal_end=1.5), "mean_removal_end is the fraction"),
    (dict(mean_removal_end="0.5"), "mean_removal_end is the fraction"),
    (dict(mean_removal_end=0.5, bias_removal=True), "mean_removal_end unset or 0"),
])
def test_bad_schedule_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        make_corrector("qdrift", gaussian_stats(steps=4), **options)


def test_a_schedule_over_one_step_is_refused():
    """One step has no end to run to: an end value other than the start would be ignored."""
    with pytest.raises(ValueError, match="one step has no end"):
        make_corrector("qdrift", gaussian_stats(steps=1), mean_removal=0.0, mean_removal_end=0.5)
    make_corrector("qdrift", gaussian_stats(steps=1), drift_scale=0.5, drift_scale_end=0.5)    # the same: fine
    with pytest.raises(ConfigError, match="sampler.steps=1 has no end"):
        validate(compose_cfg(["corrector=qdrift_plus", "sampler.steps=1", "+corrector.qdrift_plus.mean_removal_end=0.9"]),
                 inputs=False)


@pytest.mark.parametrize("overrides, match", [
    (["+corrector.qdrift_plus.drift_scale_end=-1"], "drift_scale_end must be a number >= 0"),
    (["+corrector.qdrift_plus.mean_removal_end=1.2"], "mean_removal_end must be a number in \\[0, 1\\]"),
    (["+corrector.qdrift_plus.drift_scale_end=fast"], "drift_scale_end must be a number"),
])
def test_config_refuses_bad_schedules(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(["corrector=qdrift_plus", *overrides]), inputs=False)


def test_a_mean_removal_schedule_counts_as_mean_removal_in_the_checks():
    """Mean removal only at the end still removes a mean: a map may feed it, and a stochastic sampler
    still has something to correct."""
    base = ["corrector=qdrift_plus", "corrector.qdrift_plus.mean_removal=0", "+corrector.qdrift_plus.mean_removal_end=0.5"]
    validate(compose_cfg([*base, "+corrector.qdrift_plus.mean_map_runs=8"]), inputs=False)
    validate(compose_cfg([*base, "sampler=euler_a"]), inputs=False)
    with pytest.raises(ConfigError, match="mean_map_runs is the map mean removal subtracts"):
        validate(compose_cfg([*base[:2], "+corrector.qdrift_plus.mean_map_runs=8"]), inputs=False)

def test_the_mean_errors_standard_error_comes_from_the_spread_over_runs():
    g = torch.Generator().manual_seed(3)
    run_means = torch.tensor([0.3, -0.2, 0.1, 0.0, -0.2], dtype=torch.float64)   # zero mean over runs
    e = run_means[:, None, None] + 0.01 * torch.randn(5, 1, 4096, generator=g, dtype=torch.float64)
    u = torch.randn(5, 1, 4096, generator=g, dtype=torch.float64)
    stats = pool_of(u, e).fit(5, "scalar")
    expected = run_means.std() / 5**0.5                  # positions within a run do not count as independent
    assert torch.allclose(stats.mu_e_se, expected.view(1, 1), rtol=0.02)
    assert stats.shrunk_mean_error().abs().item() < 0.1 * expected
    one = pool_of(u[:1], e[:1]).fit(1, "scalar")          # K = 1: nothing resolved, nothing removed
    assert one.mu_e_se is None and torch.equal(one.shrunk_mean_error(), torch.zeros_like(one.mu_e))


@pytest.mark.parametrize("options, match", [
    (dict(mean_removal=1.5), "in \\[0, 1\\]"),
    (dict(mean_removal=0.5, bias_removal=True), "already removes the mean"),
    (dict(mode="paper", infeasible="closest"), "not a choice of the paper rule"),
    (dict(mode="exact", infeasible="apply"), "not a choice of the exact rule"),
    (dict(mode="paper", infeasible="skip"), "not a choice of the paper rule"),   # once the rule itself
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        make_corrector("qdrift", gaussian_stats(), **options)


@pytest.mark.parametrize("overrides, match", [
    (["corrector.qdrift_plus.mean_removal=2"], "mean_removal must be a number in \\[0, 1\\]"),
    (["corrector.qdrift_plus.infeasible=nearest"], "infeasible"),
    (["corrector.qdrift_plus.mode=paper", "corrector.qdrift_plus.infeasible=closest"], "not a choice of the paper rule"),
    (["corrector.qdrift_plus.infeasible=apply"], "not a choice of the exact rule"),
    (["corrector.qdrift_plus.mean_removal=0", "+corrector.qdrift_plus.bias_removal=true",
      "corrector.qdrift_plus.infeasible=shrink"], "infeasible=shrink adds nothing"),
    (["corrector.qdrift_plus.infeasible=skip", "+corrector.qdrift_plus.shrink_strength=1.5"],
     "shrink_strength scales infeasible=shrink's slope"),
    (["corrector.qdrift_plus.infeasible=shrink", "+corrector.qdrift_plus.shrink_strength=-1"],
     "shrink_strength must be a number >= 0"),
    (["corrector.qdrift_plus.infeasible=skip", "+corrector.qdrift_plus.shrink_centre=channel"],
     "shrink_centre is where infeasible=shrink shrinks toward"),
    (["corrector.qdrift_plus.infeasible=shrink", "+corrector.qdrift_plus.shrink_centre=median"],
     "shrink_centre='median' is not an option"),
    (["eval.pool=train"], "eval.pool"),
    (["+objective=qdrift_plus"], "needs eval.pool=tune"),
    (["+objective=qdrift", "eval.pool=tune"], "must name one of this run's corrector variants"),
])
def test_config_refuses_bad_tuning_settings(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(["corrector=qdrift_plus", *overrides]), inputs=False)


def test_tune_pool_needs_bench_prompts():
    with pytest.raises(ConfigError, match="needs eval.prompt_set=bench"):
        validate(compose_cfg(["model=tiny_pixart", "eval=smoke", "+eval.pool=tune"]), inputs=False)


def test_tune_pool_is_disjoint_from_evaluation_and_calibration_prompts():
    from qdrift.bench import captions
    from qdrift.bench.dataset import split_of

    tune = tune_captions(300)
    assert len(set(tune)) == 300 and all(split_of(c) == "calib" for c in tune)    # never evaluation captions
    assert not set(tune) & set(captions("calib", TUNE_EXCLUDE))                     # nor calibration prompts
    assert tune_captions(100) == tune[:100]                                          # a larger n extends it
    split1 = BenchPrompts(start=100, pool="tune").eval_prompts(100)
    assert split1 == list(tune[100:200])                                             # splits are disjoint
    cfg = compose_cfg(["eval.pool=tune", "eval.num_prompts=50"])
    assert prompt_set(cfg.eval).eval_prompts(50) == list(tune[:50])


@pytest.mark.slow
def test_optuna_sweep_tunes_on_the_tune_pool_and_minimises_the_fid_delta(tmp_path):
    import json
    import re

    import yaml

    from .test_scale_out import qdrift

    out = qdrift(["-m", "experiment=tune_qdrift_plus", "quant=rtn_w4a8", "++quant.calib_prompts=2",
                  "eval.num_prompts=4", "batch_size=2", "sampler.steps=3", "calib.num_runs=2", "calib.batch_size=2",
                  "eval.num_resamples=50", "eval.kid_subset_size=2", "logger=none", "hydra.sweeper.n_trials=2",
                  f"output_root={tmp_path}"])
    trials = sorted(tmp_path.rglob("metrics.json"))
    assert len(trials) == 2
    deltas = []
    for metrics in trials:
        m = json.loads(metrics.read_text())
        assert m["config"]["eval"]["pool"] == "tune" and m["config"]["objective"] == "qdrift_plus"
        deltas.append(m["variants"]["qdrift_plus"]["fid_delta_vs_quant"])
    (result,) = tmp_path.rglob("optimization_results.yaml")
    best = yaml.safe_load(result.read_text())
    assert best["best_value"] == min(deltas)
    assert set(best["best_params"]) == {"corrector.qdrift_plus.drift_scale", "corrector.qdrift_plus.mean_removal",
                                        "corrector.qdrift_plus.infeasible"}
    assert best["best_params"]["corrector.qdrift_plus.infeasible"] in ("skip", "shrink")
    assert re.search(r"sweep: 2/2 jobs done \(0 failed\)", out.stdout + out.stderr)



def test_the_schedule_tuning_searches_both_ends_of_both_schedules():
    """experiment=tune_qdrift_plus_sched composes: the tune pool, the scheduled Q-Drift+ as the objective,
    and five searched values of it; untuned, its schedules are constant at Q-Drift+'s default values."""
    from hydra import compose, initialize_config_dir

    from qdrift.config import tuned_table

    from .conftest import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["experiment=tune_qdrift_plus_sched"], return_hydra_config=True)
    sched = cfg.corrector.qdrift_plus_sched
    assert cfg.eval.pool == "tune" and cfg.objective == "qdrift_plus_sched"
    assert set(cfg.hydra.sweeper.params) == {f"corrector.qdrift_plus_sched.{k}" for k in (
        "drift_scale", "drift_scale_end", "mean_removal", "mean_removal_end", "infeasible")}
    default = tuned_table()["qdrift_plus"]["default"]
    assert (sched.drift_scale, sched.drift_scale_end) == (default["drift_scale"], None)      # None: constant
    assert (sched.mean_removal, sched.mean_removal_end) == (default["mean_removal"], None)
    validate(cfg, inputs=False)



@pytest.mark.slow
def test_a_schedule_tuning_resumes_its_study_from_optuna_storage(tmp_path):
    """A tuning longer than one session: each call a sweep folder of its own and another sampler seed,
    one study in sqlite storage, so the trials add up (the study numbers them on) and none repeats."""
    import json

    import optuna

    from .test_scale_out import qdrift

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for call in (0, 1):
        qdrift(["-m", "experiment=tune_qdrift_plus_sched", "quant=rtn_w4a8", "++quant.calib_prompts=2",
                "eval.num_prompts=4", "batch_size=2", "sampler.steps=3", "calib.num_runs=2", "calib.batch_size=2",
                "eval.num_resamples=50", "eval.kid_subset_size=2", "logger=none", "hydra.sweeper.n_trials=2",
                f"hydra.sweeper.storage={storage}", f"hydra.sweeper.sampler.seed={call}",
                f"output_root={tmp_path}", f"hydra.sweep.dir={tmp_path / f'call{call}'}"])
    study = optuna.load_study(study_name="tune_qdrift_plus_sched", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    params = {json.dumps(t.params, sort_keys=True) for t in study.trials}
    assert len(params) == 4                                    # the second call did not redraw the first's
    rows = tune_summary_trials([tmp_path / "call0", tmp_path / "call1"])
    assert [r["job"] for r in rows] == [0, 1, 2, 3]
    assert sorted(r["delta"] for r in rows) == sorted(t.value for t in study.trials)


def tune_summary_trials(folders):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import tune_summary

    return tune_summary.trials(folders, "qdrift_plus_sched")

def test_gap_sources_split_a_runs_error_and_mark_infeasible_steps(run_tiny):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "gap_sources.py"
    spec = importlib.util.spec_from_file_location("gap_sources", path)
    gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap)
    _, run_dir = run_tiny(["corrector=qdrift_exact", "calib.num_runs=2", "calib.batch_size=2"])
    out = gap.gap_sources(run_dir)
    assert len(out["steps"]) == int(out["steps"][-1]["step"]) + 1 > 1
    for s in out["steps"]:
        assert s["V"] >= 0
        assert all(0 <= s[k] <= 1 for k in ("mean_share", "slope_share", "noise_share"))
    summary = __import__("json").loads((run_dir / "stats" / "summary.json").read_text())
    exact = summary["drift_factors"]["qdrift_exact"]          # the exact rule leaves infeasible steps at 0
    assert [s["step"] for s in out["steps"] if not s["exact_feasible"]] == [
        i for i, f in enumerate(exact) if all(x == 0 for x in f)]


def test_sweep_folder_names_stay_short_and_distinct():
    from qdrift.config import path_safe

    assert path_safe("model=a/b,seed=1") == "model=a_b,seed=1"          # short names: only "/" changes
    a = path_safe("x=1," * 60 + "corrector.qdrift_plus.drift_scale=1.0976270078546495")
    b = path_safe("x=1," * 60 + "corrector.qdrift_plus.drift_scale=1.0976270078546496")
    assert len(a) == len(b) == 120 and a != b and a[:109] == b[:109]    # they differ past the cut: the hash


def test_tuned_values_follow_the_setting_and_yield_to_the_command_line():
    """conf/tuned.yaml: a tuned setting gets its own values, another its default; an override wins; the
    resolved values are what the images' cache key holds."""
    from qdrift.cache import plain
    from qdrift.config import tuned_table

    def spec(*overrides):
        return plain(compose_cfg(["corrector=qdrift_plus", *overrides]).corrector)["qdrift_plus"]

    table = tuned_table()["qdrift_plus"]
    unet = spec("model=bench_unet", "quant=svdquant_w3a4")
    assert (unet["drift_scale"], unet["mean_removal"]) == tuple(
        table["bench_unet/euler/svdquant_w3a4"][k] for k in ("drift_scale", "mean_removal"))
    other = spec("model=bench_flow", "quant=mixdq_w4a8")               # not tuned: the default
    assert (other["drift_scale"], other["mean_removal"]) == (table["default"]["drift_scale"],
                                                             table["default"]["mean_removal"])
    assert unet != other                                             # so their images are cached apart
    flow = spec("model=bench_flow", "quant=svdquant_w3a4")           # a tuned choice reaches the config too
    assert flow["infeasible"] == table["bench_flow/flow_euler/svdquant_w3a4"]["infeasible"] != other["infeasible"]
    assert "bench_unet/dpmpp/svdquant_w3a4" not in table
    assert spec("model=bench_unet", "sampler=dpmpp", "quant=svdquant_w3a4")["mean_removal"] == \
        table["default"]["mean_removal"]                             # the sampler is part of the setting
    assert spec("model=bench_unet", "corrector.qdrift_plus.mean_removal=0.5")["mean_removal"] == 0.5


def test_a_key_a_tuned_setting_does_not_list_comes_from_the_default(monkeypatch):
    from qdrift import config

    assert config.tuned_value("qdrift_plus", "infeasible", "bench_dit", "dpmpp", "mixdq_w4a8") == "skip"   # untuned
    table = {"qdrift_plus": {"default": {"drift_scale": 0.5, "mean_removal": 0.2, "infeasible": "skip"},
                             "m/s/q": {"infeasible": "shrink"}}}
    monkeypatch.setattr(config, "tuned_table", lambda: table)
    assert [config.tuned_value("qdrift_plus", k, "m", "s", "q") for k in ("drift_scale", "infeasible")] == [0.5, "shrink"]
    assert config.tuned_value("qdrift_plus", "infeasible", "m", "s", "other") == "skip"


def test_tuned_values_refuse_what_they_do_not_have():
    from qdrift.config import tuned_value

    with pytest.raises(ConfigError, match="no tuned values for corrector 'qdrift'"):
        tuned_value("qdrift", "drift_scale")
    with pytest.raises(ConfigError, match="no tuned 'eta'"):
        tuned_value("qdrift_plus", "eta", "bench_dit", "dpmpp", "svdquant_w3a4")
