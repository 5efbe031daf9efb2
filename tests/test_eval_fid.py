"""FID and KID on precomputed features, checked against scipy and torchmetrics."""
import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from qdrift.eval.fid import frechet_distance, frechet_from_stats, gaussian_stats, kid


pytestmark = pytest.mark.usefixtures("one_thread")


def scipy_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """The textbook formula with scipy's sqrtm (real part: sqrtm may return tiny imaginary parts)."""
    a, b = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class Precomputed(nn.Module):
    """A 'feature network' that returns its input, so torchmetrics' metrics can be fed features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def _pair(n_a, n_b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_a, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5  # correlated, anisotropic covariance
    b = torch.randn(n_b, d, generator=g, dtype=torch.float64) @ (torch.eye(d, dtype=torch.float64) + mix) + 0.3
    return a, b


@pytest.mark.parametrize("n_a,n_b,d", [(300, 200, 16), (400, 400, 64), (50, 70, 128), (30, 200, 100), (200, 40, 160)])
def test_fid_matches_scipy_sqrtm(n_a, n_b, d):
    """Includes D > N (rank-deficient covariances) on either side."""
    a, b = _pair(n_a, n_b, d)
    ours, ref = frechet_distance(a, b), scipy_fid(a, b)
    assert ours == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(ours, rel=1e-9)  # symmetric


@pytest.mark.parametrize("n,d", [(200, 32), (40, 128)])
def test_fid_matches_torchmetrics_fed_with_features(n, d):
    a, b = _pair(n, n + 10, d, seed=1)
    metric = FrechetInceptionDistance(feature=Precomputed(d))
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(float(metric.compute()), rel=1e-5)


@pytest.mark.parametrize("n,d", [(100, 16), (20, 300)])
def test_fid_of_a_set_with_itself_is_zero(n, d):
    a, _ = _pair(n, 2, d, seed=2)
    scale = frechet_distance(a, a + 1.0)  # = |shift|^2 = d: a yardstick for "zero"
    assert scale == pytest.approx(d, rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9 * scale


@pytest.mark.parametrize("n,d", [(60, 8), (30, 200)])
def test_weighted_stats_equal_duplicated_rows(n, d):
    """Bootstrap counts must give exactly the moments of the resampled array (both factor routes)."""
    a, b = _pair(n, n, d, seed=3)
    counts = torch.bincount(torch.randint(0, n, (n,), generator=torch.Generator().manual_seed(0)), minlength=n)
    weighted = frechet_from_stats(gaussian_stats(a, counts), gaussian_stats(b))
    copied = frechet_from_stats(gaussian_stats(a.repeat_interleave(counts, dim=0)), gaussian_stats(b))
    assert float(weighted) == pytest.approx(float(copied), rel=1e-9)


def test_kid_same_distribution_near_zero_shifted_positive():
    g = torch.Generator().manual_seed(0)
    a, a2 = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
    b = torch.randn(400, 32, generator=g) + 0.5
    same_mean, same_std = kid(a, a2, subset_size=100, num_subsets=50, seed=0)
    diff_mean, diff_std = kid(a, b, subset_size=100, num_subsets=50, seed=0)
    assert diff_mean > 10 * max(abs(same_mean), same_std)
    assert diff_std > 0
    assert kid(a, b, 100, 50, seed=0) == (diff_mean, diff_std)  # seeded
    assert kid(a, b, 100, 50, seed=1) != (diff_mean, diff_std)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics_on_full_sets():
    """With subset = whole set every subset gives the same MMD, so torchmetrics' unseeded draws agree."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50, 16, generator=g, dtype=torch.float64)
    b = torch.randn(50, 16, generator=g, dtype=torch.float64) + 0.2
    metric = KernelInceptionDistance(feature=Precomputed(16), subset_size=50, subsets=3)
    metric.update(a, real=True)
    metric.update(b, real=False)
    tm_mean, _ = metric.compute()
    mean, std = kid(b, a, subset_size=500, num_subsets=3)  # subset clamps to 50
    assert mean == pytest.approx(float(tm_mean), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError, match="dims differ"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


def test_kid_full_kernel_and_per_subset_paths_agree(monkeypatch):
    import qdrift.eval.fid as fid

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(60, 8, generator=g), torch.randn(70, 8, generator=g) + 0.3
    full = kid(a, b, subset_size=20, num_subsets=10, seed=5)
    monkeypatch.setattr(fid, "KID_FULL_KERNEL_MAX_ENTRIES", 0)
    per_subset = kid(a, b, subset_size=20, num_subsets=10, seed=5)
    assert full == pytest.approx(per_subset, rel=1e-9)
