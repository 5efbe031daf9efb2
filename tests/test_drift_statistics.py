"""Calibration statistics: streaming moments, nested refits, manifests, files, teacher forcing."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save

from qdrift.drift import (
    CalibrationPool,
    InvalidStatistics,
    StatisticsMismatch,
    calibrate_batch,
    calibrate_denoisers,
    moments,
)
from qdrift.drift.calibration import PairedAccumulator
from qdrift.drift.testbed import SAMPLERS
from qdrift.models.tiny import build_tiny


def _pairs(runs=6, steps=3, c=4, n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    u_fp = torch.randn(runs, steps, 1, c, n, generator=g, dtype=torch.float64)
    e = 0.2 * u_fp + 0.1 * torch.randn(runs, steps, 1, c, n, generator=g, dtype=torch.float64) + 0.03
    return u_fp + e, e


def _accumulate(u, e, trim=0.0):
    runs, steps = u.shape[:2]
    acc = PairedAccumulator(steps, "image", trim)
    for i in range(steps):
        acc.add(i, u[:, i].reshape(runs, u.shape[3], -1), (u - e)[:, i].reshape(runs, u.shape[3], -1))
    return acc.pool({"steps": steps})


def test_streaming_moments_equal_two_pass_computation():
    u, e = _pairs()
    fit = _accumulate(u, e).fit(None, "scalar")
    for i in range(u.shape[1]):
        uu, ee = u[:, i].flatten(), e[:, i].flatten()
        assert torch.allclose(fit.mu_u[i, 0], uu.mean()) and torch.allclose(fit.mu_e[i, 0], ee.mean())
        assert torch.allclose(fit.s_uu[i, 0], uu.var(unbiased=True))
        assert torch.allclose(fit.s_ee[i, 0], ee.var(unbiased=True))
        c = torch.cov(torch.stack([uu, ee]))
        assert torch.allclose(fit.s_ue[i, 0], c[0, 1])
        v = ee.var() - c[0, 1] ** 2 / uu.var()
        assert torch.allclose(fit.residual_var[i, 0], v)


def test_channel_pooling_equals_per_channel_two_pass():
    u, e = _pairs()
    fit = _accumulate(u, e).fit(None, "channel")
    for ch in range(4):
        uu, ee = u[:, 1, 0, ch].flatten(), e[:, 1, 0, ch].flatten()
        assert torch.allclose(fit.s_ee[1, ch], ee.var()) and torch.allclose(fit.mu_u[1, ch], uu.mean())


def test_merge_is_exact_and_order_free():
    u, e = _pairs(runs=2)
    a = moments.moments_of(u[0].flatten(), e[0].flatten())
    b = moments.moments_of(u[1].flatten(), e[1].flatten())
    both = moments.moments_of(u.flatten(), e.flatten())
    assert torch.allclose(moments.merge(a, b), both) and torch.allclose(moments.merge(b, a), both)
    assert torch.allclose(moments.reduce(torch.stack([a, b]), 0), both)


@pytest.mark.parametrize("subset", [[0], [1, 4], [5, 0, 2], list(range(6))])
def test_subset_refit_equals_fitting_those_runs_alone(subset):
    u, e = _pairs()
    pool = _accumulate(u, e, trim=4.0)
    alone = _accumulate(u[subset], e[subset], trim=4.0)
    for pooling in ("scalar", "channel"):
        a, b = pool.fit(subset, pooling), alone.fit(None, pooling)
        for name in ("mu_u", "mu_e", "s_uu", "s_ee", "s_ue"):
            assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-14)
    assert torch.equal(pool.fit(3).s_ee, pool.fit([0, 1, 2]).s_ee)


def test_trimming_drops_outliers():
    u, e = _pairs(runs=1, steps=1, c=1, n=4000)
    e_out = e.clone()
    e_out[..., :5] = 50.0
    clean = _accumulate(u, e, 4.0).fit().s_ee
    dirty = _accumulate(u + (e_out - e), e_out, 4.0).fit().s_ee
    untrimmed = _accumulate(u + (e_out - e), e_out, 0.0).fit().s_ee
    assert abs(dirty - clean) / clean < 0.05 < abs(untrimmed - clean) / clean


def test_merge_works_over_leading_axes():
    """Records of (runs, steps) merge field-wise along the last axis, whatever the leading shape."""
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 50, generator=g, dtype=torch.float64)
    e = torch.randn(2, 3, 50, generator=g, dtype=torch.float64)
    merged = moments.merge(moments.moments_of(u[..., :20], e[..., :20]), moments.moments_of(u[..., 20:], e[..., 20:]))
    assert merged.shape == (2, 3, moments.FIELDS)
    assert torch.allclose(merged, moments.moments_of(u, e))


@pytest.mark.parametrize("trim_std", [4.0, 5.0, 6.0])
def test_trimming_threshold_is_trim_std_exactly(trim_std):
    """Outliers planted at 5.5 sigma: dropped at trim_std 4 and 5, kept at 6; the kept set is exactly
    |e - mean(e)| <= trim_std * std(e) (unbiased std), over the row."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(1, 20000, generator=g, dtype=torch.float64)
    e = torch.randn(1, 20000, generator=g, dtype=torch.float64)
    e = (e - e.mean()) / e.std()
    e[0, :8] = 5.5 * e.std()                            # 5.5 sigma before the planting shifts mean/std a hair
    z = (e - e.mean(-1, keepdim=True)) / e.std(-1, keepdim=True)
    expected = moments.moments_of(u, e, z.abs() <= trim_std)
    got = moments.trimmed_moments(u, e, trim_std)
    assert torch.equal(got, expected)
    assert (int(got[0, moments.N]) < 20000 - 7) == (trim_std < 5.5)   # the planted eight are in or out


def test_invalid_statistics_are_refused(tmp_path):
    pool = _accumulate(*_pairs())
    for field, value in ((moments.M_EE, -1.0), (moments.MU_U, float("nan")), (moments.N, -3.0),
                         (moments.M_UU, float("inf"))):
        bad = pool.channel.clone()
        bad[0, 0, 0, field] = value
        with pytest.raises(InvalidStatistics):
            CalibrationPool(pool.scalar, bad, {})
    from safetensors.torch import save_file

    bad = pool.scalar.clone()
    bad[0, 0, moments.M_EE] = -1.0
    save_file({"scalar": bad, "channel": pool.channel}, str(tmp_path / "neg.safetensors"),
              metadata={"manifest": "{}", "format": "qdrift-calibration-pool/1"})
    with pytest.raises(InvalidStatistics, match="neg.safetensors.*negative sums of squares"):
        CalibrationPool.load(tmp_path / "neg.safetensors")


def test_bad_k_is_rejected():
    pool = _accumulate(*_pairs())
    with pytest.raises(ValueError, match="K must be >= 1"):
        pool.fit(0)
    with pytest.raises(ValueError, match="pool holds 6"):
        pool.fit(7)


def test_save_load_roundtrip_and_corruption(tmp_path):
    pool = _accumulate(*_pairs())
    pool.manifest.update(model="m", steps=3)
    pool.save(tmp_path / "pool.safetensors")
    back = CalibrationPool.load(tmp_path / "pool.safetensors")
    assert torch.equal(back.channel, pool.channel) and back.manifest["model"] == "m"
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "pool.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="calibration statistics: corrupted file"):
        CalibrationPool.load(tmp_path / "bad.safetensors")


def test_saved_pool_bytes_do_not_depend_on_the_writer(tmp_path):
    """Equal pools give equal files (safetensors writes a metadata map in random order: one entry only),
    and a pool written with the earlier two-entry header still loads."""
    pool = _accumulate(*_pairs())
    pool.manifest.update(model="m", steps=3)
    blobs = set()
    for n in range(8):
        pool.save(tmp_path / f"p{n}.safetensors")
        blobs.add((tmp_path / f"p{n}.safetensors").read_bytes())
    assert len(blobs) == 1
    legacy = save({"scalar": pool.scalar, "channel": pool.channel},
                  metadata={"format": "qdrift-calibration-pool/1", "manifest": json.dumps(pool.manifest)})
    (tmp_path / "legacy.safetensors").write_bytes(legacy)
    assert CalibrationPool.load(tmp_path / "legacy.safetensors").manifest["model"] == "m"


def test_statistics_of_another_model_are_rejected():
    pool = _accumulate(*_pairs())
    pool.manifest.update(model="bench_dit", sampler="dpmpp", steps=3, channels=4)
    fit = pool.fit(2)
    fit.check_compatible({"model": "bench_dit", "sampler": "dpmpp", "steps": 3, "channels": 4})
    with pytest.raises(StatisticsMismatch, match="model: statistics have 'bench_dit', run has 'pixart'"):
        fit.check_compatible({"model": "pixart"})
    with pytest.raises(StatisticsMismatch, match="channels"):
        fit.check_compatible({"channels": 16})


def test_teacher_forcing_evaluates_the_quantized_model_on_fp_latents():
    """In an unmodified pipeline: the quantized pass sees exactly the FP trajectory's latents."""
    pipe = build_tiny("pixart")
    kw = dict(prompt=["a red circle", "two blue stars"], num_inference_steps=4, height=32, width=32,
              output_type="latent", use_resolution_binning=False, clean_caption=False, max_sequence_length=16)
    base = pipe.scheduler
    seen = []
    real_forward = pipe.transformer.forward

    def forward(hidden_states, *a, **k):
        seen.append(hidden_states.clone())
        out = real_forward(hidden_states, *a, **k)
        if state["quantized"]:  # a "quantized" model: the FP output plus a fixed perturbation
            out[0].add_(0.05)
        return out

    state = {"quantized": False}
    pipe.transformer.forward = forward

    def run(scheduler, quantized):
        state["quantized"] = quantized
        pipe.scheduler = scheduler
        pipe(generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kw)

    acc, timesteps = calibrate_batch(run, base, 4)
    assert len(timesteps) == 4
    fp_inputs, q_inputs = seen[:4], seen[4:]
    assert all(torch.equal(a, b) for a, b in zip(fp_inputs, q_inputs))
    fit = acc.pool({}).fit(2)
    # A constant error survives CFG unchanged: e = 0.05 everywhere, no residual variance.
    assert torch.allclose(fit.mu_e, torch.full_like(fit.mu_e, 0.05), atol=1e-5)
    assert torch.all(fit.residual_var < 1e-8)


def test_calibrate_from_two_callables():
    sch = SAMPLERS["euler"]()
    fp = lambda x, t: 0.5 * x  # noqa: E731
    quant = lambda x, t: 0.5 * x + 0.1 * torch.randn_like(x)  # noqa: E731
    pool = calibrate_denoisers(fp, quant, sch, torch.randn(5, 4, 8, 8), 10)
    fit = pool.fit(5)
    assert pool.num_runs == 5 and pool.manifest["steps"] == 10 and len(pool.manifest["timesteps"]) == 10
    assert torch.allclose(fit.s_ee, torch.full_like(fit.s_ee, 0.01), rtol=0.15)
