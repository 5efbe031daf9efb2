"""Analytic testbed (method.md section 8): Gaussian-mixture data, exact denoiser, synthetic quantization noise.

Numbers are printed (pytest -s) and tabulated in the README (experiments/analytic_testbed.py).
The regime is the feasible one: 100 steps, so each step's injected variance is small next to
sigma_n^2 on every step but the last few.
"""
from __future__ import annotations

import pytest

from qdrift.drift import testbed

STEPS, SAMPLES = 100, 4096


@pytest.fixture(scope="module")
def results():
    out = {kind: testbed.run(kind, steps=STEPS, num_samples=SAMPLES) for kind in testbed.SAMPLERS}
    for kind, r in out.items():
        fp_std = r["fp"]["mode_std"]
        print(f"\n{kind:10s} " + "  ".join(
            f"{v}: W1->FP {1e3 * m['w1_to_fp']:.2f} std {1e3 * (m['mode_std'] - fp_std):+.1f}" for v, m in r.items()))
    return out


def w1(r, v):
    return r[v]["w1_to_fp"]


def std_offset(r, v):
    return abs(r[v]["mode_std"] - r["fp"]["mode_std"])


@pytest.mark.parametrize("kind", list(testbed.SAMPLERS))
def test_quantization_noise_widens_the_modes(results, kind):
    r = results[kind]
    assert r["quant"]["mode_std"] > r["fp"]["mode_std"] and w1(r, "quant") > 0.001


@pytest.mark.parametrize("kind", list(testbed.SAMPLERS))
def test_exact_rule_moves_the_quantized_marginal_back_to_the_fp_samplers(results, kind):
    r = results[kind]
    assert w1(r, "qdrift_exact") < 0.85 * w1(r, "quant")
    assert std_offset(r, "qdrift_exact") < 0.8 * std_offset(r, "quant")


@pytest.mark.parametrize("kind", ["euler", "euler_a", "dpmpp", "ddim"])
def test_paper_rule_helps_on_epsilon_samplers(results, kind):
    r = results[kind]
    assert w1(r, "qdrift_paper") < 0.8 * w1(r, "quant")
    assert std_offset(r, "qdrift_paper") < std_offset(r, "quant")


def test_paper_rule_on_flow_euler_narrows_modes_but_leaves_the_fp_distribution(results):
    """Scaling the velocity v = eps - x0 also moves the x0 part of each sample: the within-mode
    spread shrinks toward the FP sampler's, but the samples drift away from its output (W1 up),
    as method.md anticipated."""
    r = results["flow_euler"]
    assert std_offset(r, "qdrift_paper") < std_offset(r, "quant")
    assert w1(r, "qdrift_paper") > 1.5 * w1(r, "quant")


def test_paper_rule_on_flow_dpmpp_overshoots(results):
    """Flow DPM-Solver++: the paper's y-space rule removes more spread than the noise added
    (modes end narrower than the FP sampler's), so the distance to the FP output barely changes."""
    r = results["dpmpp_flow"]
    assert r["qdrift_paper"]["mode_std"] < r["fp"]["mode_std"] < r["quant"]["mode_std"]
    assert w1(r, "qdrift_paper") == pytest.approx(w1(r, "quant"), rel=0.25)


@pytest.mark.parametrize("kind", list(testbed.SAMPLERS))
def test_d2dpm_bias_removal_hurts_when_the_error_is_pure_noise(results, kind):
    """E[e | u] from a pooled Gaussian treats the spread of u across samples as signal: with an
    error independent of the FP output it shrinks every output toward the mean (why the paper
    keeps bias removal off)."""
    r = results[kind]
    assert w1(r, "d2dpm") > 2 * w1(r, "quant")


def test_ptqd_noise_reduction_helps_the_ancestral_sampler(results):
    r = results["euler_a"]
    assert w1(r, "ptqd") < 0.6 * w1(r, "quant")
