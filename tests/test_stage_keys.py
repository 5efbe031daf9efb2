"""Every input of every stage artifact is in its key, and keys chain: a test changes each input in turn.

No model runs here: the keys are computed from the config, the prompts and a stand-in weights
identity, exactly as the stages compute them.
"""
from __future__ import annotations

import pytest
import torch

from qdrift.prompts import prompt_set
from qdrift.runner import padded_prompts
from qdrift.stages import calibrate as calibrate_mod
from qdrift.stages import generate as generate_mod
from qdrift.stages import quantize as quantize_mod
from qdrift.stages.context import RunContext

from .conftest import FAST, compose_cfg

BASE = [*FAST, "quant=rtn_w4a8", "++quant.calib_prompts=2", "corrector=qdrift"]
ALL = {"quant", "calib", "fp", "quant_images", "qdrift"}
BELOW_QUANT = {"quant", "calib", "quant_images", "qdrift"}


def stage_keys(tmp_path, overrides=(), weights=None) -> dict[str, tuple]:
    cfg = compose_cfg([*BASE, *overrides], tmp_path)
    source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, tmp_path / "run", torch.device("cpu"), source.eval_prompts(int(cfg.eval.num_prompts)),
                     source)
    ctx.batch_prompts = padded_prompts(ctx)
    ctx.weights = weights or {"tensors": "digest-0"}
    ctx.quant_art = quantize_mod.quant_artifact(ctx)
    plan = calibrate_mod.calib_plan(ctx)
    ctx.stats_key = calibrate_mod.stats_key(ctx, plan)
    keys = {"quant": ctx.quant_art.key, "calib": tuple(art.key for art, _, _ in plan)}
    for name, spec in generate_mod.variants(ctx).items():
        arts = generate_mod.batch_artifacts(ctx, generate_mod.variant_key(ctx, spec, name != "fp"))
        keys["quant_images" if name == "quant" else name] = tuple(art.key for art, _ in arts)
    return keys


def changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if a[k] != b[k]}


@pytest.mark.parametrize("override,expected", [
    ("sampler.steps=5", ALL),
    ("sampler.guidance=2.5", ALL),
    ("++sampler.options.timestep_spacing=trailing", ALL),
    ("model.resolution=48", ALL),
    ("model.max_sequence_length=8", ALL),
    ("quant.w_bits=8", BELOW_QUANT),
    ("quant.a_bits=4", BELOW_QUANT),
    ("++quant.calib_prompts=3", BELOW_QUANT),
    ("quant.seed=1", BELOW_QUANT),
    ("calib.seed=2000000", {"calib", "qdrift"}),  # Q-Drift calibration only: PTQ's seeds come from quant.seed
    ("eval.split=1", {"fp", "quant_images", "qdrift"}),
    ("replicate=1", ALL),                        # every seed and the prompts
    ("calib.trim_std=3.0", {"calib", "qdrift"}),
    ("calib.batch_size=2", {"calib", "qdrift"}),
    ("calib.num_runs=1", {"qdrift"}),             # same block of runs, fewer of them fitted
    ("calib.num_runs=5", {"calib", "qdrift"}),    # a second block
    ("batch_size=2", ALL),                       # image batches, PTQ batches and calibration blocks
    ("seed=7", {"fp", "quant_images", "qdrift"}),
    ("corrector.qdrift.drift_scale=0.5", {"qdrift"}),
    ("+corrector.qdrift.drift_scale_end=0.5", {"qdrift"}),
    ("corrector.qdrift.mode=exact", {"qdrift"}),
    ("corrector.qdrift.bias_removal=true", {"qdrift"}),
    ("corrector.qdrift.pooling=channel", {"qdrift"}),
])
def test_each_input_changes_exactly_the_keys_below_it(tmp_path, override, expected):
    assert changed(stage_keys(tmp_path), stage_keys(tmp_path, [override])) == expected


def test_library_versions_change_every_key(tmp_path, monkeypatch):
    from qdrift.stages import context

    before = stage_keys(tmp_path)
    monkeypatch.setattr(context, "software_versions", lambda: {"torch": "99.0", "diffusers": "0", "transformers": "0"})
    assert changed(before, stage_keys(tmp_path)) == ALL


def test_weights_identity_changes_every_key(tmp_path):
    assert changed(stage_keys(tmp_path), stage_keys(tmp_path, weights={"tensors": "digest-1"})) == ALL


@pytest.mark.parametrize("module,name,value,expected", [
    (generate_mod, "GENERATE_VERSION", 99, {"fp", "quant_images", "qdrift"}),
    (calibrate_mod, "CALIBRATION_VERSION", 99, {"calib", "qdrift"}),
    (generate_mod, "CORRECTOR_VERSIONS", {"qdrift": 99, "ptqd": 1, "d2dpm": 1}, {"qdrift"}),
    (quantize_mod, "algorithm_version", lambda spec: "changed/99", BELOW_QUANT),
])
def test_code_versions_are_in_the_keys(tmp_path, monkeypatch, module, name, value, expected):
    before = stage_keys(tmp_path)
    monkeypatch.setattr(module, name, value)
    assert changed(before, stage_keys(tmp_path)) == expected


def test_prompts_are_in_the_image_keys(tmp_path):
    """More prompts add batches but keep the first ones; other prompts at the same index change them."""
    four = stage_keys(tmp_path)
    six = stage_keys(tmp_path, ["eval.num_prompts=6"])
    for name in ("fp", "quant_images", "qdrift"):
        assert six[name][0] == four[name][0] and len(six[name]) == 2
    cfg = compose_cfg(BASE, tmp_path)
    source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, tmp_path, torch.device("cpu"), source.eval_prompts(4), source)
    ctx.batch_prompts, ctx.weights, ctx.stats_key = padded_prompts(ctx), {"tensors": "digest-0"}, "s"
    key = generate_mod.variant_key(ctx, None, False)
    first = generate_mod.batch_artifacts(ctx, key)[0][0].key
    ctx.batch_prompts = ["another prompt"] + ctx.batch_prompts[1:]
    assert generate_mod.batch_artifacts(ctx, key)[0][0].key != first


def test_padding_makes_batches_independent_of_the_prompt_count(tmp_path):
    """Image 4 of a 5-prompt run is made in the same batch (prompts 4..7) as in an 8-prompt run."""
    five = stage_keys(tmp_path, ["eval.num_prompts=5"])
    eight = stage_keys(tmp_path, ["eval.num_prompts=8"])
    assert five["fp"] == eight["fp"]
