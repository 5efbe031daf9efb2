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
from .test_stage_keys import stage_keys


def sums_of(e: torch.Tensor) -> ErrorSums:
    """(N runs, S steps, C, P) errors -> their sums, as the accumulator keeps them."""
    return ErrorSums(e.sum(0), (e**2).sum(0), e.shape[0])


def test_a_resolved_map_is_kept_and_an_unresolved_one_goes():
    g = torch.Generator().manual_seed(0)
    pattern = torch.linspace(-0.3, 0.3, 64, dtype=torch.float64).view(1, 1, 64)
    resolved = pattern + 0.05 * torch.randn(200, 1, 1, 64, generator=g, dtype=torch.float64)
    m = sums_of(resolved).shrunk_mean()
    assert m.shape == (1, 1, 64)
    assert torch.allclose(m, pattern.expand(1, 1, 64), atol=0.02)
    noise = torch.randn(4, 1, 1, 64, generator=g, dtype=torch.float64)   # no pattern: the mean of 4 runs is noise
    assert sums_of(noise).shrunk_mean().abs().max() < 0.25 * noise.mean(0).abs().max()


def test_the_shrinkage_is_one_factor_per_step_and_channel():
    """Vector James-Stein: the map keeps its shape and is scaled by 1 - (sum of se^2) / (sum of mean^2)."""
    g = torch.Generator().manual_seed(1)
    e = torch.randn(10, 2, 3, 16, generator=g, dtype=torch.float64) + torch.tensor([0.0, 0.5, 2.0]).view(1, 1, 3, 1)
    m, raw = sums_of(e).shrunk_mean(), e.mean(0)
    se2 = (e.var(0, unbiased=True) / 10).sum(-1, keepdim=True)
    factor = (1 - se2 / (raw**2).sum(-1, keepdim=True)).clamp_min(0)
    assert torch.allclose(m, raw * factor)
    assert (m[:, 0].abs() <= 0.5 * raw[:, 0].abs()).all()          # channel 0 has no mean: mostly gone
    assert torch.allclose(m[:, 2], raw[:, 2], rtol=0.05)           # channel 2's is resolved: kept
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
])
def test_config_refuses_bad_map_settings_before_any_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(["corrector=qdrift_plus", *overrides]), inputs=False)


MAP = ["corrector.qdrift.mode=exact", "+corrector.qdrift.mean_removal=0.5", "+corrector.qdrift.mean_map_runs=10"]


@pytest.mark.parametrize("override", ["corrector.qdrift.mean_map_runs=12", "calib.seed=2000000", "quant.seed=1",
                                      "sampler.steps=5", "quant.w_bits=8"])
def test_the_maps_inputs_change_the_corrected_images_key(tmp_path, override):
    """The map's runs, their seeds, the quantized model and the sampler are in the variant's key."""
    before = stage_keys(tmp_path, MAP)
    after = stage_keys(tmp_path, [*MAP, override])
    assert before["qdrift"] != after["qdrift"]


def test_the_map_key_ignores_batching(tmp_path):
    from qdrift.prompts import prompt_set
    from qdrift.stages.context import RunContext

    def key(overrides):
        cfg = compose_cfg(["model=tiny_pixart", "eval=smoke", "quant=rtn_w4a8", "++quant.calib_prompts=2", *overrides],
                          tmp_path)
        source = prompt_set(cfg.eval)
        ctx = RunContext(cfg, tmp_path / "run", torch.device("cpu"), source.eval_prompts(4), source)
        ctx.weights = {"tensors": "digest-0"}
        from qdrift.stages import quantize as quantize_mod
        ctx.quant_art = quantize_mod.quant_artifact(ctx)
        plan = map_mod.map_plan(ctx, 10)
        return map_mod.map_key(ctx, 10), [len(seeds) for _, _, seeds in plan]

    base, sizes = key([])
    assert sizes == [8, 2]                     # fixed chunks of MAP_CHUNK runs
    assert key(["calib.batch_size=3"])[0] == base   # (batch_size changes PTQ's batches, so the quantized model)


def test_a_run_with_the_map_computes_it_once_and_reuses_it(run_tiny, tmp_path):
    import numpy as np
    from PIL import Image

    overrides = ["corrector=qdrift_plus_map", "corrector.qdrift_plus_map.mean_map_runs=3",
                 "corrector.qdrift_plus_map.mean_removal=1.0"]
    metrics, run_dir = run_tiny(overrides)
    chunks = sorted((tmp_path / "cache" / "error_map").glob("*/manifest.json"))
    assert len(chunks) == 1                   # 3 runs: one chunk
    assert "qdrift_plus_map" in metrics["variants"]
    again, run_dir2 = run_tiny(overrides)
    assert sorted((tmp_path / "cache" / "error_map").glob("*/manifest.json")) == chunks
    pick = lambda d, v: np.asarray(Image.open(d / "images" / v / "0.png"), dtype=np.int16)   # noqa: E731
    assert np.array_equal(pick(run_dir, "qdrift_plus_map"), pick(run_dir2, "qdrift_plus_map"))
    assert np.abs(pick(run_dir, "qdrift_plus_map") - pick(run_dir, "quant")).max() > 0
