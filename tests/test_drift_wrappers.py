"""Scheduler wrappers: bit-identical when there is nothing to correct; factors as the method states."""
from __future__ import annotations

import pytest
import torch

from qdrift.drift import QDrift, DriftStatistics, make_corrector, schedule_of, wrap_scheduler
from qdrift.drift.layout import broadcastable, by_channel
from qdrift.drift.rules import coefficients
from qdrift.drift.testbed import SAMPLERS
from qdrift.models.tiny import build_tiny


def stats(steps, V=0.0, channels=1, bias=0.0):
    z = torch.zeros(steps, channels, dtype=torch.float64)
    return DriftStatistics(z + bias, z + bias, z + 1.0, z + V, z)


def trajectory(kind, hook, steps=12, seed=0):
    """Run a sampler on a fixed smooth 'model' from fixed noise; returns the final sample."""
    sch = wrap_scheduler(SAMPLERS[kind](), hook)
    sch.set_timesteps(steps)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * float(getattr(sch, "init_noise_sigma", 1.0))
    gen = torch.Generator().manual_seed(seed + 1)
    for t in sch.timesteps:
        x_in = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
        u = torch.tanh(x_in) * 0.8 + 0.1 * x_in
        x = sch.step(u, t, x, **({"generator": gen} if kind == "euler_a" else {})).prev_sample
    return x


HOOKS = {
    "qdrift_paper": lambda s: QDrift(s, mode="paper"),
    "qdrift_exact": lambda s: QDrift(s, mode="exact"),
    "ptqd": lambda s: make_corrector("ptqd", s),
    "d2dpm": lambda s: make_corrector("d2dpm", s),
}


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
@pytest.mark.parametrize("variant", ["qdrift_paper", "qdrift_exact", "ptqd", "d2dpm", "qdrift_off"])
def test_zero_variance_or_correction_off_is_bit_identical(kind, variant):
    base = trajectory(kind, None)
    if variant == "qdrift_off":
        hook = QDrift(stats(12, V=0.3), drift_scale=0.0)
    else:
        hook = HOOKS[variant](stats(12, V=0.0))
    assert torch.equal(trajectory(kind, hook), base)


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_nonzero_variance_changes_the_trajectory(kind):
    assert not torch.equal(trajectory(kind, QDrift(stats(12, V=0.05))), trajectory(kind, None))


def test_wrapped_scheduler_inside_an_unmodified_pipeline_is_bit_identical():
    pipe = build_tiny("pixart")
    kw = dict(prompt=["a red circle"], num_inference_steps=5, height=32, width=32, output_type="pt",
              use_resolution_binning=False, clean_caption=False, max_sequence_length=16)
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    base = pipe.scheduler
    pipe.scheduler = wrap_scheduler(base, QDrift(stats(5, V=0.0)))
    same = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.scheduler = wrap_scheduler(base, QDrift(stats(5, V=0.2)))
    moved = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(plain, same) and not torch.equal(plain, moved)


@pytest.mark.parametrize("kind", ["euler", "flow_euler", "euler_a"])
def test_euler_family_factor_is_dsigma_v_over_two_sigma(kind):
    sch = SAMPLERS[kind]()
    sch.set_timesteps(10)
    V = torch.linspace(0.01, 0.2, 10, dtype=torch.float64)[:, None]
    coef = coefficients(schedule_of(sch), V, "paper")
    sig = sch.sigmas.double()
    s_i, s_n = sig[:-1], sig[1:]
    if kind == "euler_a":  # Delta sigma = sigma_down - sigma
        up = (s_n**2 * (s_i**2 - s_n**2) / s_i**2).sqrt()
        s_n = (s_n**2 - up**2).sqrt()
        c = coef.out[:, 0] - 1
    else:
        c = coef.p[:, 0] - 1
        assert torch.allclose(coef.q[:, 0], -c)  # x_n' = x_n + c (x_n - x_i): the update scaled by 1 + c
    assert torch.allclose(c, (s_i - s_n).abs() * V[:, 0] / (2 * s_i))


def test_first_order_dpmpp_factor_is_the_exact_integral_rule():
    sch = SAMPLERS["dpmpp"]()
    sch.config.solver_order = 1
    sch.set_timesteps(10)
    V = torch.full((10, 1), 0.07, dtype=torch.float64)
    sched = schedule_of(sch)
    coef = coefficients(sched, V, "paper")
    sbar = sched.sigma_i / sched.alpha_i
    sbar_n = sched.sigma_n / sched.alpha_n
    expected = (sbar - sbar_n) * 0.07 / (sbar + sbar_n)
    assert torch.allclose(coef.p[:, 0] - 1, expected)
    assert torch.allclose(coef.q[:, 0], -expected * sched.alpha_n / sched.alpha_i)


def test_dpmpp_second_order_weights_match_diffusers_update():
    """The effective-x0 weights reproduce diffusers' own 2M step from two data predictions."""
    sched = schedule_of(_set(SAMPLERS["dpmpp"](), 8))
    # Linear check: perturb the current data prediction only and compare the response with the weight.
    sch2 = SAMPLERS["dpmpp"]()
    sch2.set_timesteps(8)
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    outs = []
    for i, t in enumerate(sch2.timesteps):
        base = _clone_step(sch2, torch.zeros_like(x), t, x)
        bumped = _clone_step(sch2, torch.ones_like(x), t, x)
        gain = sched.x0_gain[i]   # d x0 / d eps at step i
        coef_x0 = sched.alpha_n[i] - sched.sigma_n[i] * sched.alpha_i[i] / sched.sigma_i[i]
        outs.append(((bumped - base).item(), (coef_x0 * sched.weights[i, 0] * gain).item()))
        sch2.step(torch.zeros_like(x), t, x)
    for got, want in outs:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-8)


def _set(sch, steps):
    sch.set_timesteps(steps)
    return sch


def _clone_step(sch, eps, t, x):
    import copy

    c = copy.deepcopy(sch)
    return c.step(eps, t, x).prev_sample


def test_packed_layout_maps_features_to_latent_channels():
    b, c, h, w = 2, 4, 4, 6
    latents = torch.randn(b, c, h, w)
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    a = by_channel(packed, "packed").sort(-1).values
    e = by_channel(latents, "image").sort(-1).values
    assert torch.equal(a, e)
    v = torch.arange(c, dtype=torch.float32)
    bp = broadcastable(v, packed, "packed").expand_as(packed)
    unpacked = bp.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    assert torch.equal(unpacked, v.view(1, c, 1, 1).expand(b, c, h, w))


def test_ptqd_undoes_a_linear_error_exactly():
    # e = k u_fp + b  =>  u = (1 + k) u_fp + b; PTQD recovers u_fp.
    k, b = 0.1, 0.05
    u_fp = torch.randn(10000, dtype=torch.float64)
    u = (1 + k) * u_fp + b
    e = u - u_fp
    from qdrift.drift.moments import covariance, moments_of

    cov = covariance(moments_of(u, e))
    st = DriftStatistics(*(cov[n].reshape(1, 1) for n in ("mu_u", "mu_e", "s_uu", "s_ee", "s_ue")))
    ptqd = make_corrector("ptqd", st)
    fixed = ptqd.transform_output(0, u.reshape(1, 1, 100, 100).float())
    assert torch.allclose(fixed.double().flatten(), u_fp, atol=1e-5)


def test_bias_removal_subtracts_the_conditional_mean():
    st = DriftStatistics(torch.tensor([[2.0]]).double(), torch.tensor([[0.5]]).double(),
                         torch.tensor([[4.0]]).double(), torch.tensor([[1.0]]).double(), torch.tensor([[1.0]]).double())
    u = torch.full((1, 1, 2, 2), 3.0)
    q = QDrift(st, bias_removal=True)
    # E[e | u] = 0.5 + (1 / 4) (3 - 2) = 0.75
    assert torch.allclose(q.transform_output(0, u), u - 0.75)
    assert torch.allclose(make_corrector("d2dpm", st).transform_output(0, u), u - 0.75)


def test_statistics_from_another_step_count_or_timesteps_are_rejected():
    from qdrift.drift import StatisticsMismatch

    sch = wrap_scheduler(SAMPLERS["euler"](), QDrift(stats(10)))
    with pytest.raises(StatisticsMismatch, match="10 steps, the sampler runs 12"):
        sch.set_timesteps(12)
    st = stats(12)
    st.manifest["timesteps"] = list(range(12))
    sch = wrap_scheduler(SAMPLERS["euler"](), QDrift(st))
    with pytest.raises(StatisticsMismatch, match="other timesteps"):
        sch.set_timesteps(12)


def test_stochastic_flow_sampling_keeps_bias_removal_only():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    sch.set_timesteps(10)
    coef = coefficients(schedule_of(sch), torch.full((10, 1), 0.1, dtype=torch.float64), "paper")
    assert torch.equal(coef.p, torch.ones_like(coef.p)) and torch.equal(coef.q, torch.zeros_like(coef.q))


def test_channel_pooling_broadcasts_per_channel_factors():
    V = torch.tensor([[0.0, 0.1, 0.2, 0.3]] * 12, dtype=torch.float64)
    st = DriftStatistics(V * 0, V * 0, V * 0 + 1, V, V * 0, pooling="channel")
    a = trajectory("euler", QDrift(st))
    b = trajectory("euler", None)
    assert torch.equal(a[:, 0], b[:, 0])            # V = 0 in channel 0: untouched
    assert not torch.equal(a[:, 3], b[:, 3])


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_wrapped_scheduler_keeps_the_signatures_pipelines_inspect(kind):
    """Pipelines look for `sigmas`/`timesteps` in set_timesteps and `eta`/`generator` in step."""
    import inspect

    base = SAMPLERS[kind]()
    wrapped = wrap_scheduler(base, QDrift(stats(4)))
    for name in ("set_timesteps", "step"):
        assert inspect.signature(getattr(wrapped, name)) == inspect.signature(getattr(base, name))


def test_ancestral_sampling_in_a_pipeline_stays_seeded_when_wrapped():
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = build_tiny("sdxl")
    base = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    kw = dict(prompt=["a red circle"], num_inference_steps=4, height=32, width=32, output_type="pt", guidance_scale=0.0)
    pipe.scheduler = base
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.scheduler = wrap_scheduler(base, QDrift(stats(4, V=0.0)))
    torch.manual_seed(123)  # the global RNG must not matter: noise comes from the generator
    wrapped = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(plain, wrapped)
