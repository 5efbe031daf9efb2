"""Paired bootstrap of the FID change and bootstrap CIs of per-image means."""
import pytest
import torch

from qdrift.eval.bootstrap import bootstrap_mean_ci, paired_bootstrap_fid_delta
from qdrift.eval.fid import frechet_distance


pytestmark = pytest.mark.usefixtures("one_thread")


def _sets(n=120, d=24, shift_x=0.6, shift_y=0.1, seed=0, n_ref=None):
    """ref ~ N(0, I); x and y are per-prompt perturbations of one shared draw (paired), shifted away from ref."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n_ref or n, d, generator=g, dtype=torch.float64)
    base = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = base + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) + shift_x
    y = base + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) + shift_y
    return x, y, ref


def test_identical_variants_give_exactly_zero():
    x, _, ref = _sets()
    out = paired_bootstrap_fid_delta(x, x.clone(), ref, num_resamples=50, seed=0)
    assert out["delta"] == 0.0 and out["ci_low"] == 0.0 and out["ci_high"] == 0.0
    assert out["p_below_zero"] == 0.0 and out["num_resamples"] == 50


def test_clearly_better_variant_has_ci_below_zero():
    x, y, ref = _sets(shift_x=0.6, shift_y=0.1)
    out = paired_bootstrap_fid_delta(x, y, ref, num_resamples=100, seed=0)
    assert out["delta"] == pytest.approx(frechet_distance(y, ref) - frechet_distance(x, ref), rel=1e-9)
    assert out["ci_high"] < 0 and out["p_below_zero"] == 1.0
    worse = paired_bootstrap_fid_delta(y, x, ref, num_resamples=100, seed=0)  # roles swapped
    assert worse["ci_low"] > 0 and worse["p_below_zero"] == 0.0


def test_ci_covers_point_estimate_and_is_seeded():
    x, y, ref = _sets(shift_x=0.25, shift_y=0.2, seed=1)
    out = paired_bootstrap_fid_delta(x, y, ref, num_resamples=200, seed=3)
    assert out["ci_low"] < out["delta"] < out["ci_high"]
    assert paired_bootstrap_fid_delta(x, y, ref, num_resamples=200, seed=3) == out
    assert paired_bootstrap_fid_delta(x, y, ref, num_resamples=200, seed=4)["ci_low"] != out["ci_low"]
    narrower = paired_bootstrap_fid_delta(x, y, ref, num_resamples=200, seed=3, ci=0.5)
    assert out["ci_low"] < narrower["ci_low"] <= narrower["ci_high"] < out["ci_high"]


def test_reference_of_other_size_is_resampled_independently():
    x, y, ref = _sets(n=80, n_ref=150, d=16, shift_x=0.6, shift_y=0.1, seed=2)
    out = paired_bootstrap_fid_delta(x, y, ref, num_resamples=60, seed=0)
    assert out["ci_high"] < 0
    assert out["delta"] == pytest.approx(frechet_distance(y, ref) - frechet_distance(x, ref), rel=1e-9)


def test_rank_deficient_features_work():
    """D > N, as with 2048-d Inception features and a few hundred prompts."""
    x, y, ref = _sets(n=40, d=100, shift_x=0.5, shift_y=0.0, seed=5)
    out = paired_bootstrap_fid_delta(x, y, ref, num_resamples=40, seed=0)
    assert out["ci_high"] < 0


def test_misaligned_inputs_rejected():
    x, y, ref = _sets()
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap_fid_delta(x, y[:-1], ref, num_resamples=5)
    with pytest.raises(ValueError, match="dims differ"):
        paired_bootstrap_fid_delta(x, y, ref[:, :-1], num_resamples=5)


def test_bootstrap_mean_ci():
    g = torch.Generator().manual_seed(0)
    values = 30 + 2 * torch.randn(400, generator=g)
    out = bootstrap_mean_ci(values, num_resamples=300, seed=0)
    assert out["mean"] == pytest.approx(float(values.double().mean()))
    assert out["ci_low"] < out["mean"] < out["ci_high"]
    # width ~ 2 * 1.96 * sd / sqrt(n) = 0.39; a loose check that it is a CI of the mean, not of the values
    assert 0.25 < out["ci_high"] - out["ci_low"] < 0.55
    const = bootstrap_mean_ci(torch.full((10,), 7.5), num_resamples=20)
    assert const == {"mean": 7.5, "ci_low": 7.5, "ci_high": 7.5}
    with pytest.raises(ValueError):
        bootstrap_mean_ci(torch.empty(0))


@pytest.mark.parametrize("n,m,d", [(30, 30, 50), (25, 40, 60)])
def test_cross_gram_route_equals_direct_fid_of_resample(n, m, d):
    """The D >= N fast path (cross-Gram + mean corrections) against the plain weighted-moment FID."""
    from qdrift.eval.bootstrap import _frechet_rows, _rows
    from qdrift.eval.fid import frechet_from_stats, gaussian_stats

    x, _, _ = _sets(n=n, d=d, seed=7)
    r = torch.randn(m, d, generator=torch.Generator().manual_seed(8), dtype=torch.float64) + 2.0
    g = torch.Generator().manual_seed(0)
    cx = torch.bincount(torch.randint(0, n, (n,), generator=g), minlength=n)
    cr = torch.bincount(torch.randint(0, m, (m,), generator=g), minlength=m)
    fast = _frechet_rows(_rows(x, cx), _rows(r, cr), x @ r.T)
    direct = frechet_from_stats(gaussian_stats(x, cx), gaussian_stats(r, cr))
    assert float(fast) == pytest.approx(float(direct), rel=1e-9)


@pytest.mark.parametrize("constant_feature", [False, True])
def test_batched_route_equals_direct_fid_of_each_resample(constant_feature):
    """The N > D fast path (Cholesky + eigvalsh, batched) against plain weighted-moment FIDs; a constant
    feature makes the reference covariances singular and exercises the eigen-factor fallback."""
    from qdrift.eval.bootstrap import _chunk_deltas, _resample_counts
    from qdrift.eval.fid import frechet_from_stats, gaussian_stats

    x, y, r = _sets(n=80, d=10, seed=9)
    if constant_feature:
        x[:, 0] = y[:, 0] = r[:, 0] = 0.5
    counts = _resample_counts(80, 6, torch.Generator().manual_seed(0))
    fast = _chunk_deltas(x, y, r, counts, counts, None)
    for b in range(6):
        sr = gaussian_stats(r, counts[b])
        direct = frechet_from_stats(gaussian_stats(y, counts[b]), sr) - frechet_from_stats(
            gaussian_stats(x, counts[b]), sr
        )
        assert float(fast[b]) == pytest.approx(float(direct), rel=1e-7, abs=1e-9)
