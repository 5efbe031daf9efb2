"""Raw calibration samples (Fig. 4 / Fig. 5) and per-step drift factors exported by the calibrate stage:
fixed coordinates, the same values whatever the batching, small files, factors equal to the corrector's."""
from __future__ import annotations

import json

import pytest
import torch

from qdrift.drift.calibration import PairedAccumulator
from qdrift.drift.samples import (
    FIELD_CHANNELS,
    FIELD_POSITIONS,
    SAMPLE_COORDINATES,
    ErrorSamples,
    sample_coordinates,
    sample_steps,
)
from qdrift.drift.layout import by_channel

from .conftest import FAST, compose_cfg

QUANT = ["quant=rtn_w4a8", "++quant.calib_prompts=2"]


def test_kept_steps_and_coordinates_depend_on_the_shape_alone():
    assert sample_steps(20) == [0, 10, 19] and sample_steps(4) == [0, 2, 3] and sample_steps(1) == [0]
    points, field = sample_coordinates(4, 64)      # a small latent: every position of the first channels
    assert len(points) == SAMPLE_COORDINATES and points.unique().numel() == SAMPLE_COORDINATES
    assert torch.equal(field, torch.arange(FIELD_CHANNELS * 64))
    assert sorted({int(p) // 64 for p in points}) == [0, 1, 2, 3]   # spread over every channel
    points, field = sample_coordinates(16, 128 * 128)   # FLUX-size: bounded
    assert len(points) == SAMPLE_COORDINATES and len(field) == FIELD_CHANNELS * FIELD_POSITIONS
    assert field.unique().numel() == len(field) and int(field.max()) < FIELD_CHANNELS * 128 * 128
    assert sample_coordinates(3, 2)[0].tolist() == [0, 1, 2, 3, 4, 5]   # fewer cells than coordinates: all


def _accumulate(u, e, batches):
    """Samples of runs fed to the accumulator in the given batch split (per step (runs, C, H, W))."""
    parts = []
    for rows in batches:
        acc = PairedAccumulator(u.shape[1])
        for i in range(u.shape[1]):
            acc.add(i, u[rows, i], (u - e)[rows, i])
        parts.append(acc.samples({"seeds": rows}))
    out = parts[0]
    for part in parts[1:]:
        out = out.extend(part)
    return out


def test_accumulator_keeps_each_runs_values_whatever_the_batch():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(4, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    e = 0.1 * torch.randn(4, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    one = _accumulate(u, e, [[0, 1, 2, 3]])
    split = _accumulate(u, e, [[0], [1, 2], [3]])
    assert one.steps == [0, 2, 4] and (one.channels, one.positions) == (3, 16)
    assert one.u.shape == (4, 3, SAMPLE_COORDINATES) and one.field.shape == (4, 3, FIELD_CHANNELS * 16)
    for name in ("u", "e", "field"):
        assert torch.equal(getattr(one, name), getattr(split, name)), name
    assert split.manifest["seeds"] == [0, 1, 2, 3]
    flat_u, flat_e = by_channel(u[:, 4], "image").reshape(4, -1), by_channel(e[:, 4], "image").reshape(4, -1)
    assert torch.allclose(one.u[:, 2], flat_u[:, one.points].float())      # step 4 is the third kept step
    assert torch.allclose(one.e[:, 2], flat_e[:, one.points].float(), atol=1e-7)
    assert torch.allclose(one.field[:, 2], flat_e[:, one.field_points].float(), atol=1e-7)
    c, p = divmod(int(one.points[0]), 16)
    assert one.point_label(0) == f"channel {c}, position {p}"


def test_samples_file_round_trip_and_join_checks(tmp_path):
    g = torch.Generator().manual_seed(1)
    u, e = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    s = _accumulate(u, e, [[0, 1]])
    s.save(tmp_path / "s.safetensors")
    back = ErrorSamples.load(tmp_path / "s.safetensors")
    assert (back.steps, back.channels, back.positions, back.manifest) == (s.steps, s.channels, s.positions, s.manifest)
    for name in ("u", "e", "field", "points", "field_points"):
        assert torch.equal(getattr(back, name), getattr(s, name))
    other = _accumulate(u[:, :2], e[:, :2], [[0, 1]])   # 2 steps: other kept steps
    with pytest.raises(ValueError, match="other steps or coordinates"):
        s.extend(other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="unreadable error samples"):
        ErrorSamples.load(tmp_path / "bad.safetensors")


def _calibrate(tmp_path, name, overrides, model="tiny_pixart"):
    from qdrift.prompts import prompt_set
    from qdrift.stages.build import build
    from qdrift.stages.calibrate import calibrate_stage
    from qdrift.stages.context import RunContext
    from qdrift.stages.quantize import quantize_stage

    fast = [o if not o.startswith("model=") else f"model={model}" for o in FAST]
    cfg = compose_cfg([*fast, *QUANT, *overrides], tmp_path)
    source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, tmp_path / name, torch.device("cpu"), source.eval_prompts(4), source)
    build(ctx)
    quantize_stage(ctx)
    return ctx, calibrate_stage(ctx)


def test_stored_samples_do_not_depend_on_the_calibration_batch_size(tmp_path, one_thread):
    """Runs 0..3 in two blocks of 2 or one block of 4: the same stored samples, bit for bit, in the
    block artifacts and in the run dir's stats/ (the pool's run order)."""
    from qdrift.stages.calibrate import SAMPLES_FILE

    stored = {}
    for bs in (2, 4):
        ctx, pool = _calibrate(tmp_path, f"bs{bs}", ["calib.num_runs=4", f"calib.batch_size={bs}"])
        blocks = sorted((tmp_path / "cache" / "calib").glob(f"*/{SAMPLES_FILE}"))
        assert len(blocks) == {2: 2, 4: 3}[bs]   # the cache is shared: bs=4 adds its own block
        s = ErrorSamples.load(ctx.run_dir / "stats" / SAMPLES_FILE)
        assert s.num_runs == pool.num_runs == 4 and s.steps == [0, 2, 3]
        assert s.u.shape == s.e.shape == (4, 3, SAMPLE_COORDINATES)
        assert s.field.shape == (4, 3, FIELD_CHANNELS * min(s.positions, FIELD_POSITIONS))
        assert s.manifest["seeds"] == [1000000, 1000001, 1000002, 1000003]
        assert s.e.abs().max() > 0 and torch.isfinite(s.field).all()   # RTN W4A8 really perturbs the output
        assert (ctx.run_dir / "stats" / SAMPLES_FILE).stat().st_size < 64 * 1024
        stored[bs] = s
    for name in ("u", "e", "field", "points", "field_points"):
        assert torch.equal(getattr(stored[2], name), getattr(stored[4], name)), name


@pytest.mark.parametrize("model", ["tiny_pixart", "tiny_flux"])   # FLUX: the pipeline sets shifted sigmas and mu
def test_exported_drift_factors_are_the_correctors_own(tmp_path, one_thread, model):
    """stats/summary.json's per-step factors equal QDrift.drift_factors() as prepared by the pipeline
    itself during generation; PTQD and D^2-DPM have none."""
    from qdrift.drift import wrap_scheduler
    from qdrift.stages.generate import corrector_for, variants
    from qdrift.stages.sampling import call_pipeline

    ctx, pool = _calibrate(tmp_path, "run", ["calib.num_runs=2", "corrector=all",
                                             "corrector.qdrift.pooling=channel"], model)
    summary = json.loads((ctx.run_dir / "stats" / "summary.json").read_text())
    assert set(summary["drift_factors"]) == {"qdrift", "qdrift_exact", "qdrift_plus"}
    for name, spec in variants(ctx).items():
        if name not in summary["drift_factors"]:
            continue
        hook = corrector_for(ctx, name, spec, pool)
        call_pipeline(ctx, ctx.prompts[:1], [0], wrap_scheduler(ctx.base_scheduler, hook), output_type="latent")
        expected = hook.drift_factors().double()
        assert expected.shape == (4, pool.num_channels if name in ("qdrift", "qdrift_plus") else 1)   # channel pooling
        assert torch.equal(torch.tensor(summary["drift_factors"][name], dtype=torch.float64), expected), name
        assert expected.abs().max() > 0
    assert summary["drift_factors"]["qdrift"] != summary["drift_factors"]["qdrift_exact"]
