"""Q-Drift's mean error map (`mean_map_runs`, drift/error_map.py, stages/error_map.py): the map's arithmetic
and shrinkage, its layouts, the corrector option, its validation, its cache keys and a run through the runner."""
from __future__ import annotations

import pytest
import torch

from qdrift.config import ConfigError, validate
from qdrift.drift import StatisticsMismatch, make_corrector
from qdrift.drift.error_map import ErrorMapAccumulator, ErrorSums, to_latent
from qdrift.drift.layout import by_channel
from qdrift.stages import error_map as map_mod

from .conftest import compose_cfg
from .test_correctors import pool_of


def sums_of(e: torch.Tensor) -> ErrorSums:
    """(N runs, S steps, C, P) errors -> their sums, as the accumulator keeps them."""
    return ErrorSums(e.sum(0), (e**2).sum(0), (e.mean(-1) ** 2).sum(0), e.shape[0])


def test_a_resolved_map_is_kept_and_an_unresolved_one_goes():
    g = torch.Generator().manual_seed(0)
    pattern = torch.linspace(-0.3, 0.3, 64, dtype=torch.float64).view(1, 1, 64)
    resolved = pattern + 0.05 * torch.randn(200, 1, 1, 64, generator=g, dtype=torch.float64)
    m = sums_of(resolved).shrunk_mean()
    assert m.shape == (1, 1, 64)
    assert torch.allclose(m, pattern.expand(1, 1, 64), atol=0.02)
    noise = torch.randn(4, 1, 1, 64, generator=g, dtype=torch.float64)   # no pattern: the mean of 4 runs is noise
    assert sums_of(noise).shrunk_mean().abs().max() < 0.25 * noise.mean(0).abs().max()


def test_the_channel_mean_and_the_spatial_residual_are_shrunk_apart():
    """A clear channel mean must not carry an unresolved spatial pattern along (review finding): the
    residual gets a James-Stein factor of its own, and so does the channel mean."""
    g = torch.Generator().manual_seed(1)
    runs, positions = 64, 1024
    e = 0.5 + torch.randn(runs, 1, 1, positions, generator=g, dtype=torch.float64)   # a channel mean, no pattern
    m, raw = sums_of(e).shrunk_mean(), e.mean(0)
    assert torch.allclose(m.mean(-1), raw.mean(-1), rtol=0.01)            # the resolved channel mean stays
    residual, raw_residual = m - m.mean(-1, keepdim=True), raw - raw.mean(-1, keepdim=True)
    assert residual.pow(2).sum() < 0.05 * raw_residual.pow(2).sum()       # the noise around it mostly goes
    # The formula: each part times max(0, 1 - se^2 / part^2), the residual as one vector.
    channel = raw.mean(-1, keepdim=True)
    se2_channel = e.mean(-1).var(0, unbiased=True).unsqueeze(-1) / runs
    se2_residual = (e.var(0, unbiased=True) / runs).sum(-1, keepdim=True)
    expected = channel * (1 - se2_channel / channel**2).clamp_min(0) + \
        raw_residual * (1 - se2_residual / raw_residual.pow(2).sum(-1, keepdim=True)).clamp_min(0)
    assert torch.allclose(m, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2 runs"):
        sums_of(e[:1]).shrunk_mean()


def test_sums_join_in_any_chunking_to_the_same_map():
    g = torch.Generator().manual_seed(2)
    e = torch.randn(12, 3, 2, 8, generator=g, dtype=torch.float64) + 0.3
    whole = sums_of(e)
    parts = sums_of(e[:5]) + sums_of(e[5:8]) + sums_of(e[8:])
    assert parts.runs == 12 and torch.allclose(parts.shrunk_mean(), whole.shrunk_mean(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="cannot join"):
        whole + sums_of(e[:, :, :1])


@pytest.mark.parametrize("layout, shape", [("image", (3, 4, 5, 6)), ("packed", (3, 10, 8))])
def test_the_accumulator_reads_both_layouts_and_to_latent_inverts_the_view(layout, shape):
    g = torch.Generator().manual_seed(3)
    u_fp, e = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    acc = ErrorMapAccumulator(2, layout)
    for i in range(2):
        acc.add(i, u_fp + (i + 1) * e, u_fp)
    s = acc.sums()
    view = by_channel(e.double(), layout)
    assert s.runs == 3 and torch.allclose(s.total[1], 2 * view.sum(0), atol=1e-5)
    assert torch.allclose(s.total_sq[0], (view**2).sum(0), atol=1e-5)
    assert torch.allclose(s.channel_sq[1], (2 * view.mean(-1)).pow(2).sum(0), atol=1e-5)
    back = to_latent(view[0], e, layout)      # (C, P) -> the latent's own shape
    assert back.shape == (1, *shape[1:]) and torch.allclose(back[0], e[0])
    with pytest.raises(RuntimeError, match="did not see steps"):
        ErrorMapAccumulator(3, layout).sums()


def map_stats(channels=4, positions=6):
    g = torch.Generator().manual_seed(4)
    u = torch.randn(5, channels, positions, generator=g, dtype=torch.float64)
    e = 0.1 + 0.05 * torch.randn(5, channels, positions, generator=g, dtype=torch.float64)
    return pool_of(u + e, e).fit(5, "channel")


def test_mean_removal_subtracts_the_map_instead_of_the_channel_mean():
    stats = map_stats()
    mean_map = torch.linspace(-1, 1, 24, dtype=torch.float64).view(1, 4, 6)
    hook = make_corrector("qdrift", stats, mode="exact", mean_removal=0.5, mean_map_runs=8).use_mean_map(mean_map)
    u = torch.randn(2, 4, 2, 3)
    out = hook.transform_output(0, u)
    assert torch.allclose(out, u - 0.5 * mean_map.float().view(1, 4, 2, 3))
    plain = make_corrector("qdrift", stats, mode="exact", mean_removal=0.5).transform_output(0, u)
    assert torch.allclose(plain, u - 0.5 * stats.shrunk_mean_error().float().view(1, 4, 1, 1))


def test_without_the_spatial_part_only_the_maps_channel_means_are_removed():
    stats = map_stats()
    mean_map = torch.linspace(-1, 1, 24, dtype=torch.float64).view(1, 4, 6)
    hook = make_corrector("qdrift", stats, mode="exact", mean_removal=0.5, mean_map_runs=8,
                          mean_map_spatial=False).use_mean_map(mean_map)
    u = torch.randn(2, 4, 2, 3)
    assert torch.allclose(hook.transform_output(0, u), u - 0.5 * mean_map.mean(-1).float().view(1, 4, 1, 1))
    with pytest.raises(ValueError, match="mean_map_spatial"):
        make_corrector("qdrift", stats, mode="exact", mean_removal=0.5, mean_map_spatial=False)


def test_the_map_must_fit_the_statistics_and_the_latents():
    stats = map_stats()
    hook = make_corrector("qdrift", stats, mode="exact", mean_removal=0.5, mean_map_runs=8)
    with pytest.raises(RuntimeError, match="no mean error map"):
        hook.transform_output(0, torch.zeros(1, 4, 2, 3))
    with pytest.raises(StatisticsMismatch, match="does not fit 1 steps and 4 channels"):
        hook.use_mean_map(torch.zeros(2, 4, 6, dtype=torch.float64))
    with pytest.raises(StatisticsMismatch, match="does not fit"):
        hook.use_mean_map(torch.zeros(1, 3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        hook.use_mean_map(torch.full((1, 4, 6), float("nan"), dtype=torch.float64))
    hook.use_mean_map(torch.zeros(1, 4, 6, dtype=torch.float64))
    with pytest.raises(StatisticsMismatch, match="another resolution"):
        hook.transform_output(0, torch.zeros(1, 4, 4, 4))


@pytest.mark.parametrize("options", [dict(mean_map_runs=1, mean_removal=0.5), dict(mean_map_runs=8),
                                     dict(mean_map_runs=-2, mean_removal=0.5), dict(mean_map_runs=True, mean_removal=0.5)])
def test_bad_map_options_are_refused(options):
    with pytest.raises(ValueError, match="mean_map_runs"):
        make_corrector("qdrift", map_stats(), mode="exact", **options)


@pytest.mark.parametrize("overrides, match", [
    (["+corrector.qdrift_plus.mean_map_runs=1"], "at least 2 runs"),
    (["+corrector.qdrift_plus.mean_map_runs=5000"], "out of the tune pool"),
    (["+corrector.qdrift_plus.mean_map_runs=8", "corrector.qdrift_plus.mean_removal=0"], "mean_removal > 0"),
    (["+corrector.qdrift_plus.mean_map_runs=eight"], "must be an integer"),
    (["+corrector.qdrift_plus.mean_map_spatial=false"], "set corrector.qdrift_plus.mean_map_runs"),
    (["+corrector.qdrift_plus.mean_map_runs=8", "+corrector.qdrift_plus.mean_map_spatial=maybe"], "mean_map_spatial"),
])
def test_config_refuses_bad_map_settings_before_any_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(["corrector=qdrift_plus", *overrides]), inputs=False)


def map_ctx(tmp_path, overrides=()):
    from qdrift.prompts import prompt_set
    from qdrift.stages import quantize as quantize_mod
    from qdrift.stages.context import RunContext

    cfg = compose_cfg(["model=tiny_pixart", "eval=smoke", "quant=rtn_w4a8", "++quant.calib_prompts=2", *overrides],
                      tmp_path)
    source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, tmp_path / "run", torch.device("cpu"), source.eval_prompts(4), source)
    ctx.weights = {"tensors": "digest-0"}
    ctx.quant_art = quantize_mod.quant_artifact(ctx)
    return ctx


@pytest.mark.parametrize("override, moves", [
    ("calib.seed=2000000", True), ("quant.seed=1", True), ("sampler.steps=5", True), ("quant.w_bits=8", True),
    ("calib.batch_size=3", False), ("calib.num_runs=3", False), ("calib.trim_std=3.0", False), ("seed=7", False),
])
def test_the_map_key_holds_what_the_map_depends_on_and_nothing_else(tmp_path, override, moves):
    base = map_mod.map_key(map_ctx(tmp_path), 10)
    assert (map_mod.map_key(map_ctx(tmp_path, [override]), 10) != base) == moves
    assert map_mod.map_key(map_ctx(tmp_path), 11) != base


def test_the_variant_key_holds_the_map_key(tmp_path, monkeypatch):
    from qdrift.stages import generate as generate_mod

    ctx = map_ctx(tmp_path)
    ctx.stats_key = "stats"
    spec = {"kind": "qdrift", "mode": "exact", "mean_removal": 0.5, "mean_map_runs": 10}
    assert generate_mod.variant_key(ctx, spec, True)["mean_map"] == map_mod.map_key(ctx, 10)
    monkeypatch.setattr(generate_mod, "map_key", lambda ctx, runs: "another map")
    assert generate_mod.variant_key(ctx, spec, True)["mean_map"] == "another map"
    assert "mean_map" not in generate_mod.variant_key(ctx, {**spec, "mean_map_runs": 0}, True)


def test_the_shrinkage_version_is_in_the_map_key(tmp_path, monkeypatch):
    ctx = map_ctx(tmp_path)
    before = map_mod.map_key(ctx, 10)
    monkeypatch.setattr(map_mod, "SHRINKAGE_VERSION", 99)
    assert map_mod.map_key(ctx, 10) != before


def test_chunks_are_fixed_and_shared_by_a_larger_map(tmp_path):
    ctx = map_ctx(tmp_path)
    ten, twenty = map_mod.map_plan(ctx, 10), map_mod.map_plan(ctx, 20)
    assert [len(seeds) for _, _, seeds in ten] == [8, 2] and [len(seeds) for _, _, seeds in twenty] == [8, 8, 4]
    assert ten[0][0].key == twenty[0][0].key and ten[1][0].key != twenty[1][0].key


def test_a_run_with_the_map_computes_it_once_and_reuses_it(run_tiny, tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    calls = []
    real = map_mod._map_chunk
    monkeypatch.setattr(map_mod, "_map_chunk", lambda *a: calls.append(1) or real(*a))
    overrides = ["corrector=[qdrift_plus,qdrift_plus_map]", "corrector.qdrift_plus_map.mean_map_runs=10",
                 "corrector.qdrift_plus_map.mean_removal=1.0", "corrector.qdrift_plus.mean_removal=1.0"]
    metrics, run_dir = run_tiny(overrides)
    assert len(calls) == 2                     # 10 runs: two chunks, each computed once
    assert "error_map/10" in metrics["timing"]
    pick = lambda d, v: np.asarray(Image.open(d / "images" / v / "0.png"), dtype=np.int16)   # noqa: E731
    # Same settings but the mean removed: the map per position against the channel mean.
    assert np.abs(pick(run_dir, "qdrift_plus_map") - pick(run_dir, "qdrift_plus")).max() > 0
    again, _ = run_tiny(overrides)             # every image cached: the map is not even read
    assert len(calls) == 2 and "error_map/10" not in again["timing"]
    other, _ = run_tiny([*overrides, "eval.split=1"])   # new images, the same map from the cache
    assert len(calls) == 2 and "error_map/10" in other["timing"]
    # A second map variant of another size in the same run: a map of its own (one more chunk), not the first's.
    same = "kind:qdrift,mode:exact,infeasible:skip,drift_scale:0.5,mean_removal:1.0,pooling:channel"
    two, run_dir2 = run_tiny(["corrector=none", f"+corrector.big_map={{{same},mean_map_runs:10}}",
                              f"+corrector.small_map={{{same},mean_map_runs:3}}", "eval.split=2"])
    assert len(calls) == 3 and {"error_map/10", "error_map/3"} <= set(two["timing"])
    assert np.abs(pick(run_dir2, "big_map") - pick(run_dir2, "small_map")).max() > 0


def test_config_and_inputs_count_the_maps_runs(tmp_path):
    base = ["model=tiny_pixart", "eval=smoke", "corrector=qdrift_plus_map"]
    with pytest.raises(ConfigError, match="quant=none has none"):
        validate(compose_cfg([*base, "quant=none"]), inputs=False)
    with pytest.raises(ConfigError, match="mean_map_runs=2000"):   # the builtin set has fewer calibration prompts
        validate(compose_cfg([*base, "corrector.qdrift_plus_map.mean_map_runs=2000"]))
    with pytest.raises(ConfigError, match="calibration"):           # its seeds would reach the evaluation seeds
        validate(compose_cfg([*base, "seed=20", "calib.seed=0"]), inputs=False)


# --- the analytic testbed (qdrift/drift/testbed.py): constant bias, no spatial pattern --------------------
DETERMINISTIC = ["euler", "flow_euler", "dpmpp", "dpmpp_flow", "ddim"]


@pytest.fixture(scope="module")
def testbed_with_map():
    from qdrift.drift import testbed

    out = {}
    for setting, error in testbed.SETTINGS.items():
        for kind in DETERMINISTIC:
            m = testbed.mean_error_map(kind, 20, error=error)

            def correctors(pool, n, m=m):
                stats = pool.fit(n, "channel")
                return {"plus": make_corrector("qdrift", stats, **testbed.plus_options()),
                        "plus_map": make_corrector("qdrift", stats, **testbed.plus_options(),
                                                   mean_map_runs=64).use_mean_map(m)}

            out[setting, kind] = testbed.run(kind, steps=20, num_samples=2048, error=error, make_correctors=correctors)
    return out


@pytest.mark.parametrize("setting", ["noise", "correlated", "biased"])
def test_the_map_is_never_worse_than_the_quantized_sampler_on_the_testbed(testbed_with_map, setting):
    for kind in DETERMINISTIC:
        r = testbed_with_map[setting, kind]
        assert r["plus_map"]["w1_to_fp"] <= r["quant"]["w1_to_fp"], kind


def test_a_constant_bias_is_removed_better_by_the_maps_64_runs_than_by_k_5(testbed_with_map):
    """No spatial pattern here: what the map adds is a channel mean resolved by 64 runs instead of 5."""
    for kind in DETERMINISTIC:
        r = testbed_with_map["biased", kind]
        assert r["plus_map"]["w1_to_fp"] < r["plus"]["w1_to_fp"], kind
