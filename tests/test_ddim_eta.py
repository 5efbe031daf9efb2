"""DDIM with eta > 0 (PTQD's setting) through the runner: config, step noise, calibration, cache keys."""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qdrift.config import ConfigError, probe_scheduler, validate
from qdrift.drift import Corrector
from qdrift.prompts import prompt_set
from qdrift.quant import quant_enabled
from qdrift.runner import padded_prompts
from qdrift.samplers import make_scheduler, sampler_eta, sampler_options, split_options
from qdrift.stages import calibrate as calibrate_mod
from qdrift.stages import generate as generate_mod
from qdrift.stages import quantize as quantize_mod
from qdrift.stages.build import build
from qdrift.stages.context import RunContext
from qdrift.stages.sampling import call_pipeline

from .conftest import FAST, compose_cfg

ROOT = Path(__file__).resolve().parents[1]
DDIM = ["sampler=ddim", "+sampler.options.eta=1.0"]
QUANT = ["quant=rtn_w4a8", "++quant.calib_prompts=2"]
PEERS = "corrector=[ptqd,d2dpm,d2dpm_stochastic,cumcomp]"


def refused(overrides) -> str:
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([*FAST, *overrides]), inputs=False)
    return str(err.value)


# --- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize("eta", ["0.0", "0.5", "1", "1.0"])
def test_ddim_eta_in_range_is_accepted_with_the_peer_correctors(eta):
    cfg = compose_cfg([*FAST, "sampler=ddim", f"+sampler.options.eta={eta}", PEERS])
    validate(cfg, inputs=False)
    assert sampler_eta(cfg.sampler) == float(eta)


@pytest.mark.parametrize("eta", ["1.5", "-0.1", "abc", "true", "nan"])
def test_ddim_eta_out_of_range_or_not_a_number_is_refused(eta):
    msg = refused(["sampler=ddim", f"+sampler.options.eta={eta}", "corrector=none"])
    assert "sampler.options.eta" in msg


def test_eta_on_another_sampler_is_refused():
    msg = refused(["sampler=dpmpp", "+sampler.options.eta=0.5", "corrector=none"])
    assert "sampler=dpmpp has none" in msg and "sampler=ddim" in msg


def test_eta_on_a_pipeline_without_eta_is_refused():
    """FluxPipeline.__call__ has no eta (DDIM cannot run a flow model anyway; an epsilon FLUX stand-in can)."""
    msg = refused(["model=tiny_flux", "model.prediction=epsilon", "sampler=ddim", "+sampler.options.eta=0.5",
                   "corrector=none"])
    assert "FluxPipeline" in msg and "takes no eta" in msg
    validate(compose_cfg([*FAST, "model=tiny_flux", "model.prediction=epsilon", "sampler=ddim",
                          "+sampler.options.eta=0.0", "corrector=none"]), inputs=False)


@pytest.mark.parametrize("correctors", ["corrector=all", "corrector=qdrift", "corrector=[qdrift_exact,ptqd]"])
def test_qdrift_variants_are_refused_with_eta(correctors):
    msg = refused([*DDIM, correctors])
    assert "Q-Drift has no drift rule for DDIM's own noise" in msg and "eta=1 > 0" in msg
    assert "ptqd, d2dpm, d2dpm_stochastic and cumcomp" in msg and "corrector=[ptqd,d2dpm]" in msg
    if correctors == "corrector=all":
        assert "corrector.qdrift, corrector.qdrift_exact:" in msg and "corrector=all includes Q-Drift" in msg


def test_qdrift_bias_removal_alone_is_allowed_with_a_warning(caplog):
    """As on the other stochastic samplers: bias removal still acts, the drift rule does not."""
    with caplog.at_level(logging.WARNING, logger="qdrift"):
        validate(compose_cfg([*FAST, *DDIM, "corrector=qdrift", "corrector.qdrift.bias_removal=true"]),
                 inputs=False)
    assert "only Q-Drift's bias or mean removal acts" in caplog.text


def test_eta_stays_out_of_the_scheduler():
    cfg = compose_cfg([*FAST, *DDIM, PEERS])
    assert sampler_options(cfg.sampler) == ({}, {"eta": 1.0})
    assert split_options("ddim", {"eta": 0.3, "timestep_spacing": "trailing"}) == (
        {"timestep_spacing": "trailing"}, {"eta": 0.3})
    assert split_options("dpmpp", {"eta": 0.3}) == ({"eta": 0.3}, {})   # not a step argument there: refused
    assert "eta" not in probe_scheduler(cfg).config
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="arguments of ddim's steps"):
        make_scheduler("ddim", DDIMScheduler(), "epsilon", {"eta": 1.0})


# --- cache keys --------------------------------------------------------------------------------
def keys(tmp_path, overrides) -> dict[str, object]:
    cfg = compose_cfg([*FAST, *QUANT, "sampler=ddim", "corrector=ptqd", *overrides], tmp_path)
    source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, tmp_path / "run", torch.device("cpu"), source.eval_prompts(int(cfg.eval.num_prompts)),
                     source)
    ctx.batch_prompts = padded_prompts(ctx)
    ctx.weights = {"tensors": "digest-0"}
    ctx.quant_art = quantize_mod.quant_artifact(ctx)
    plan = calibrate_mod.calib_plan(ctx)
    ctx.stats_key = calibrate_mod.stats_key(ctx, plan)
    out = {"quant": ctx.quant_art.key, "calib": tuple(art.key for art, _, _ in plan), "settings": ctx.settings()}
    for name, spec in generate_mod.variants(ctx).items():
        arts = generate_mod.batch_artifacts(ctx, generate_mod.variant_key(ctx, spec, name != "fp"))
        out[name] = tuple(art.key for art, _ in arts)
    return out


def test_eta_changes_the_calibration_and_image_keys(tmp_path):
    plain, zero = keys(tmp_path, []), keys(tmp_path, ["+sampler.options.eta=0.0"])
    one, half = keys(tmp_path, ["+sampler.options.eta=1.0"]), keys(tmp_path, ["+sampler.options.eta=0.5"])
    for name in ("quant", "calib", "fp", "ptqd"):
        assert len({plain[name], one[name], half[name]}) == 3, name
        assert zero[name] == plain[name], name   # eta = 0 is what runs without it: the same images
    assert keys(tmp_path, ["+sampler.options.eta=1"]) == one   # 1 and 1.0 are one setting
    assert (plain["settings"]["eta"], one["settings"]["eta"]) == (0.0, 1.0)   # the statistics' manifest


# --- the stochastic sampler on a tiny pipeline -------------------------------------------------
@pytest.fixture(scope="module")
def stacks(tmp_path_factory):
    """eta -> (context, pool): tiny PixArt with DDIM, quantized (RTN W4A8) and calibrated (K = 2)."""
    out = {}
    tmp = tmp_path_factory.mktemp("eta")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for eta in (0.0, 1.0):
            cfg = compose_cfg([*FAST, *QUANT, "sampler=ddim", f"+sampler.options.eta={eta}", "corrector=[ptqd,d2dpm]",
                               "eval.num_prompts=2", "device=cpu", "calib.batch_size=2"], tmp)
            validate(cfg)
            source = prompt_set(cfg.eval)
            ctx = RunContext(cfg, tmp / f"run{eta}", torch.device("cpu"), source.eval_prompts(2), source)
            ctx.batch_prompts = padded_prompts(ctx)
            build(ctx)
            quantize_mod.quantize_stage(ctx)
            out[eta] = (ctx, calibrate_mod.calibrate_stage(ctx))
        yield out
    finally:
        torch.set_num_threads(threads)


def latents(ctx, pool, variant: str, seeds: list[int], batch: int) -> torch.Tensor:
    spec = generate_mod.variants(ctx)[variant]
    hook = generate_mod.corrector_for(ctx, variant, spec, pool) if spec is not None else None
    scheduler = generate_mod.wrap_scheduler(ctx.base_scheduler, hook)
    prompts = ctx.prompt_set.eval_prompts(len(seeds))
    with quant_enabled(ctx.denoiser, variant != "fp"):
        return torch.cat([call_pipeline(ctx, prompts[i:i + batch], seeds[i:i + batch], scheduler, "latent")
                          for i in range(0, len(seeds), batch)])


@pytest.mark.parametrize("variant", ["fp", "quant", "ptqd", "d2dpm"])
def test_step_noise_is_per_sample_and_independent_of_batching(stacks, variant):
    ctx, pool = stacks[1.0]
    together = latents(ctx, pool, variant, [0, 1], batch=2)
    assert torch.equal(together, latents(ctx, pool, variant, [0, 1], batch=1))   # bit for bit
    assert torch.equal(together, latents(ctx, pool, variant, [0, 1], batch=2))   # and repeatable
    assert not torch.equal(together, latents(stacks[0.0][0], stacks[0.0][1], variant, [0, 1], batch=2))


def test_ptqd_shrinks_ddims_own_noise(stacks, monkeypatch):
    ctx, pool = stacks[1.0]
    seen = []
    real = Corrector._ddim_noisy_step

    def spy(self, i, u, eta, parent, step_kwargs):
        seen.append(eta)
        return real(self, i, u, eta, parent, step_kwargs)

    monkeypatch.setattr(Corrector, "_ddim_noisy_step", spy)
    ptqd = latents(ctx, pool, "ptqd", [0, 1], batch=2)
    assert seen == [1.0] * int(ctx.cfg.sampler.steps)   # every step of the batch saw the pipeline's eta
    assert not torch.equal(ptqd, latents(ctx, pool, "quant", [0, 1], batch=2))


def test_calibration_follows_the_stochastic_fp_trajectory(stacks):
    """Teacher forcing on the noisy FP trajectory (it raises if the quantized pass leaves it): finite
    statistics, other than eta = 0's, and the FP trajectory it records is the FP sampler's own."""
    pool0, (ctx1, pool1) = stacks[0.0][1], stacks[1.0]
    for pool in (pool0, pool1):
        assert torch.isfinite(pool.scalar).all() and torch.isfinite(pool.channel).all()
        fit = pool.fit(2, "scalar")
        assert torch.isfinite(fit.residual_var).all() and (fit.residual_var > 0).all()
    assert not torch.allclose(pool0.scalar, pool1.scalar)
    assert (pool0.manifest["eta"], pool1.manifest["eta"]) == (0.0, 1.0)

    from qdrift.drift.calibration import TrajectoryRecorder

    seeds = [int(ctx1.cfg.calib.seed) + i for i in range(2)]
    prompts = ctx1.prompt_set.calib_prompts(2)
    recorder = TrajectoryRecorder()
    with quant_enabled(ctx1.denoiser, False):
        final = call_pipeline(ctx1, prompts, seeds, generate_mod.wrap_scheduler(ctx1.base_scheduler, recorder),
                              "latent")
        plain = call_pipeline(ctx1, prompts, seeds, ctx1.base_scheduler, "latent")
    assert torch.equal(recorder.final, final) and torch.equal(final, plain)


# --- end to end --------------------------------------------------------------------------------
def test_runner_with_eta_gives_the_same_images_at_any_batch_size(run_tiny, tmp_path, one_thread):
    """FP, quantized and PTQD images of DDIM eta = 1, batch_size 1 vs 2. The latents are equal bit for bit
    (test above); the VAE decodes a batch of 2 to within ~4e-7 of two batches of 1, which can move a pixel
    across a rounding boundary of the PNG (as at eta = 0), so PNGs agree to one level."""
    overrides = [*DDIM, *QUANT, "corrector=ptqd", "eval.num_prompts=2", "calib.batch_size=2"]
    runs = {bs: run_tiny([*overrides, f"batch_size={bs}"], cache=tmp_path / "cache") for bs in (2, 1)}
    for bs, (metrics, run_dir) in runs.items():
        assert set(metrics["variants"]) == {"fp", "quant", "ptqd"}
        assert metrics["config"]["sampler"]["options"] == {"eta": 1.0}
        summary = json.loads((run_dir / "stats/summary.json").read_text())
        assert all(np.isfinite(v).all() for v in summary["residual_var_scalar"])
    for variant in ("fp", "quant", "ptqd"):
        for i in range(2):
            a, b = (np.asarray(Image.open(runs[bs][1] / "images" / variant / f"{i}.png"), dtype=int) for bs in (1, 2))
            diff = np.abs(a - b)
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (variant, i)


# --- tables ------------------------------------------------------------------------------------
def test_bench_table_names_eta():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "experiments" / "bench_table.py")
    bench_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_table)
    assert bench_table.CORRECTOR_ORDER[-2:] == ("d2dpm_stochastic", "cumcomp")
    assert bench_table.sampler_label({"name": "ddim", "options": {"eta": 1.0}}) == "ddim eta=1"
    assert bench_table.sampler_label({"name": "ddim", "options": {"eta": 0}}) == "ddim"
    assert bench_table.sampler_label({"name": "dpmpp"}) == "dpmpp"


def test_workspace_lists_every_corrector():
    from omegaconf import OmegaConf

    from qdrift.tracking.workspace import CORRECTORS

    every = OmegaConf.load(ROOT / "conf" / "corrector" / "all.yaml").defaults
    assert list(CORRECTORS) == list(every)


def test_the_printed_header_names_eta():
    from qdrift.eval.evaluate import format_header

    config = {"model": {"name": "m"}, "quant": {"name": "q"}, "calib": {"num_runs": 5}, "corrector": {"ptqd": {}},
              "eval": {"prompt_set": "bench"}, "sampler": {"name": "ddim", "steps": 30, "guidance": 4.0}}
    assert "sampler=ddim (30 steps, CFG 4)" in format_header(config, 16)
    config["sampler"]["options"] = {"eta": 1.0}
    assert "sampler=ddim (30 steps, eta 1, CFG 4)" in format_header(config, 16)
