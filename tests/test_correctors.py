"""Peer correctors as their papers define them: PTQD's fit, D^2-DPM's stochastic draw, cumulative
compensation's bias removal, and the stochastic samplers' noise absorption (Euler ancestral, DDIM eta > 0)."""
from __future__ import annotations

import pytest
import torch

from qdrift.config import ConfigError, validate
from qdrift.drift import CalibrationPool, DriftStatistics, make_corrector, wrap_scheduler
from qdrift.drift import moments, testbed
from qdrift.drift.rules import ddim_noise_std
from qdrift.drift.testbed import SAMPLERS

from .conftest import compose_cfg


def pool_of(u: torch.Tensor, e: torch.Tensor) -> CalibrationPool:
    """A one-step pool from (N runs, C channels, L positions) samples, as calibration records them."""
    n, c, _ = u.shape
    channel = moments.trimmed_moments(u, e, 0)[:, None]                               # (N, 1, C, 6)
    scalar = moments.trimmed_moments(u.reshape(n, -1), e.reshape(n, -1), 0)[:, None]  # (N, 1, 6)
    return CalibrationPool(scalar, channel)


def gaussian_stats(mu_u=0.3, mu_e=0.1, s_uu=2.0, s_ee=0.5, s_ue=0.6, steps=1) -> DriftStatistics:
    t = lambda v: torch.full((steps, 1), v, dtype=torch.float64)  # noqa: E731
    return DriftStatistics(t(mu_u), t(mu_e), t(s_uu), t(s_ee), t(s_ue))


# --- PTQD ------------------------------------------------------------------------------------------
def linear_error(k: float, bias: list[float], noise: float = 0.01, seed: int = 0):
    """u_fp per channel N(0, 1), e = k u_fp + b_c + noise: the error model PTQD assumes."""
    g = torch.Generator().manual_seed(seed)
    u_fp = torch.randn(5, len(bias), 4096, generator=g, dtype=torch.float64)
    e = k * u_fp + torch.tensor(bias, dtype=torch.float64)[None, :, None] + noise * torch.randn(
        u_fp.shape, generator=g, dtype=torch.float64)
    return u_fp, e


def test_ptqd_recovers_one_slope_and_per_channel_biases():
    bias = [0.2, -0.1, 0.05, 0.0]
    u_fp, e = linear_error(0.08, bias)
    ptqd = make_corrector("ptqd", pool_of(u_fp + e, e).fit(5, "channel"))
    assert ptqd.k.shape == (1, 1) and ptqd.b.shape == (1, 4)      # one k per step, a bias per channel
    assert float(ptqd.k) == pytest.approx(0.08, abs=2e-3)
    assert torch.allclose(ptqd.b[0], torch.tensor(bias, dtype=torch.float64), atol=2e-3)
    fixed = ptqd.transform_output(0, (u_fp + e)[:1].float())
    assert (fixed.double() - u_fp[:1]).abs().max() < 0.06          # only the noise / (1 + k) is left
    # The residual it absorbs on stochastic samplers: Var(noise) / (1 + k)^2.
    assert torch.allclose(ptqd.absorbed_variance(), torch.full((1, 4), 1e-4 / 1.08**2, dtype=torch.float64),
                          rtol=0.1)


def test_ptqd_with_scalar_pooling_uses_one_bias():
    u_fp, e = linear_error(0.08, [0.2, -0.1, 0.05, 0.0])
    ptqd = make_corrector("ptqd", pool_of(u_fp + e, e).fit(5, "scalar"))
    assert ptqd.b.shape == (1, 1) and float(ptqd.b) == pytest.approx(0.0375, abs=2e-3)


def test_ptqd_clamps_a_negative_correlation_to_zero():
    u_fp, e = linear_error(-0.1, [0.2, -0.1, 0.05, 0.0])
    stats = pool_of(u_fp + e, e).fit(5, "channel")
    assert float(stats.scalar().s_ue - stats.scalar().s_ee) < 0                  # the fitted slope is negative
    ptqd = make_corrector("ptqd", stats)
    assert float(ptqd.k) == 0.0
    assert torch.allclose(ptqd.b, stats.mu_e)                                    # k = 0: b is the mean error
    u = (u_fp + e)[:1].float()
    assert torch.allclose(ptqd.transform_output(0, u), u - stats.mu_e.float().view(1, 4, 1))


def test_channel_statistics_carry_their_scalar_fit():
    u_fp, e = linear_error(0.08, [0.2, -0.1])
    pool = pool_of(u_fp + e, e)
    channel = pool.fit([0, 2, 4], "channel")
    assert torch.equal(channel.scalar().s_ue, pool.fit([0, 2, 4], "scalar").s_ue)
    hand_made = DriftStatistics(channel.mu_u, channel.mu_e, channel.s_uu, channel.s_ee, channel.s_ue, "channel")
    with pytest.raises(ValueError, match="without their scalar fit"):
        make_corrector("ptqd", hand_made)


# --- D^2-DPM --------------------------------------------------------------------------------------------
def test_d2dpm_stochastic_draws_the_fitted_conditional_gaussian():
    st = gaussian_stats()
    u0 = 1.5
    u = torch.full((4, 1, 128, 128), u0)
    out = make_corrector("d2dpm", st, variant="stochastic").transform_output(0, u).double()
    # e | u ~ N(mu_e + s_ue / s_uu (u - mu_u), s_ee - s_ue^2 / s_uu) = N(0.46, 0.32)
    drawn = u.double() - out
    assert float(drawn.mean()) == pytest.approx(0.1 + 0.3 * (u0 - 0.3), abs=0.005)
    assert float(drawn.var()) == pytest.approx(0.5 - 0.6**2 / 2.0, rel=0.02)
    assert float(st.residual_var) == pytest.approx(0.32)
    # The deterministic variant subtracts the mean only.
    det = make_corrector("d2dpm", st).transform_output(0, u).double()
    assert torch.allclose(u.double() - det, torch.full_like(det, 0.46), atol=1e-6)


def trajectory(kind, hook, seed=0, steps=10):
    sch = wrap_scheduler(SAMPLERS[kind](), hook)
    sch.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    for t in sch.timesteps:
        x = sch.step(torch.tanh(x) * 0.8, t, x).prev_sample
    return x


def test_d2dpm_stochastic_runs_repeat_exactly_and_depend_on_seed_and_latents():
    st = gaussian_stats(steps=10)
    hook = make_corrector("d2dpm", st, variant="stochastic")
    a = trajectory("ddim", hook)
    assert torch.equal(a, trajectory("ddim", hook))                                         # replay
    assert torch.equal(a, trajectory("ddim", make_corrector("d2dpm", st, variant="stochastic")))
    assert not torch.equal(a, trajectory("ddim", make_corrector("d2dpm", st, variant="stochastic", seed=1)))
    assert not torch.equal(a[0], trajectory("ddim", hook, seed=1)[0])                      # other latents
    assert not torch.equal(a, trajectory("ddim", make_corrector("d2dpm", st)))              # not the mean


def test_d2dpm_stochastic_draws_do_not_depend_on_the_batch():
    """A trajectory's draws come from its own initial latent: sampled alone or next to another, the same."""
    st = gaussian_stats(steps=6)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def run(x):
        sch = wrap_scheduler(SAMPLERS["ddim"](), make_corrector("d2dpm", st, variant="stochastic"))
        sch.set_timesteps(6)
        for t in sch.timesteps:
            x = sch.step(torch.tanh(x) * 0.8, t, x).prev_sample
        return x

    together = run(x0.clone())
    assert torch.equal(together[1:2], run(x0[1:2].clone()))
    assert torch.equal(together[2:], run(x0[[2, 0]].clone())[:1])


def test_d2dpm_variant_is_validated():
    with pytest.raises(ValueError, match="unknown D\\^2-DPM variant"):
        make_corrector("d2dpm", gaussian_stats(), variant="sampled")
    with pytest.raises(ConfigError, match="variant"):
        validate(compose_cfg(["model=tiny_pixart", "corrector=d2dpm_stochastic",
                              "corrector.d2dpm_stochastic.variant=sampled"]))


# --- cumulative compensation ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["euler", "dpmpp", "flow_euler"])
def test_cumcomp_removes_a_constant_per_step_bias(kind):
    biased = testbed.QuantError(bias=0.05, var_min=0.0, var_max=0.0)
    r = testbed.run(kind, steps=20, num_samples=512, error=biased)
    assert r["quant"]["w1_to_fp"] > 0.02
    assert r["cumcomp"]["w1_to_fp"] < 0.01 * r["quant"]["w1_to_fp"]


def test_cumcomp_subtracts_the_mean_error_per_channel():
    u_fp, e = linear_error(0.0, [0.2, -0.1, 0.05, 0.0])
    stats = pool_of(u_fp + e, e).fit(5, "channel")
    u = (u_fp + e)[:1].float()
    assert torch.allclose(make_corrector("cumcomp", stats).transform_output(0, u), u - stats.mu_e.float().view(1, 4, 1))


# --- the sampler's own noise ------------------------------------------------------------------------------
def ddim_step(hook, eta, noise=None, generator=None, steps=10, i=6):
    sch = wrap_scheduler(SAMPLERS["ddim"](), hook)
    sch.set_timesteps(steps)
    t = sch.timesteps[i]
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    u = torch.tanh(x)
    return sch.step(u, t, x, eta=eta, variance_noise=noise, generator=generator).prev_sample, sch, t


def residual_only(R: float, steps=10) -> DriftStatistics:
    """PTQD statistics with k = 0, b = 0 and a residual of variance R (s_ue = s_ee: e independent of u_fp)."""
    return gaussian_stats(mu_u=0.0, mu_e=0.0, s_uu=1.0 + R, s_ee=R, s_ue=R, steps=steps)


@pytest.mark.parametrize("R", [0.05, 50.0])
def test_ptqd_shrinks_the_ddim_noise_by_the_residual(R):
    z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    plain, sch, t = ddim_step(None, 0.7, noise=z)
    fixed, _, _ = ddim_step(make_corrector("ptqd", residual_only(R)), 0.7, noise=z)
    # DDIM's step from the scheduler's own tables: std = eta sigma_t, c = d x_prev / d eps.
    a_t = float(sch.alphas_cumprod[t])
    a_p = float(sch.alphas_cumprod[t - 1000 // 10])
    std = 0.7 * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)) ** 0.5
    c = (1 - a_p - std**2) ** 0.5 - (a_p * (1 - a_t) / a_t) ** 0.5
    reduced = max(std**2 - c**2 * R, 0.0) ** 0.5                  # R = 50: clamped, no noise left
    assert torch.allclose(fixed - plain, (reduced - std) * z, atol=1e-5)
    assert (reduced == 0) == (R == 50.0)


def test_ddim_noise_shrink_keeps_the_generators_stream_and_positional_arguments():
    hook = make_corrector("ptqd", residual_only(0.05))
    from_generator, _, _ = ddim_step(hook, 1.0, generator=torch.Generator().manual_seed(3))
    z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(from_generator, ddim_step(hook, 1.0, noise=z)[0])
    sch = wrap_scheduler(SAMPLERS["ddim"](), hook)
    sch.set_timesteps(10)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    positional = sch.step(torch.tanh(x), sch.timesteps[6], x, 1.0, False, None, z).prev_sample
    assert torch.equal(positional, from_generator)


@pytest.mark.parametrize("name", ["ptqd", "d2dpm"])
def test_zero_residual_leaves_ddim_with_eta_bit_identical(name):
    z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    assert torch.equal(ddim_step(make_corrector(name, residual_only(0.0)), 0.5, noise=z)[0],
                       ddim_step(None, 0.5, noise=z)[0])


def test_d2dpm_absorbs_its_residual_variance_and_the_others_leave_the_noise_alone():
    z = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    st = residual_only(0.05)
    absorbing = make_corrector("d2dpm", st)
    keeping = make_corrector("d2dpm", st)
    keeping.absorbed_variance = lambda: None
    fixed, sch, t = ddim_step(absorbing, 1.0, noise=z)
    std, reduced = (float(v[6, 0]) for v in ddim_noise_std(absorbing.schedule, 1.0, st.residual_var, "epsilon"))
    assert reduced < std
    assert torch.allclose(fixed - ddim_step(keeping, 1.0, noise=z)[0], (reduced - std) * z, atol=1e-5)
    plain = ddim_step(None, 1.0, noise=z)[0]
    for hook in (make_corrector("qdrift", st), make_corrector("cumcomp", st),            # no noise handling
                 make_corrector("d2dpm", gaussian_stats(s_ee=0.05, s_ue=0.0, steps=10), variant="stochastic")):
        hook.transform_output = lambda i, u: u
        assert torch.equal(ddim_step(hook, 1.0, noise=z)[0], plain)
