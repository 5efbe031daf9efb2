"""Replicates: `replicate=r` sets the four seeds of a result (quant.seed, eval.split, seed, calib.seed),
and each of them changes exactly the artifacts that depend on it (README, "Replicates")."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from qdrift.cache import plain
from qdrift.config import ConfigError, validate   # (importing it registers the replicate_seed resolver)
from qdrift.prompts import BenchPrompts, BuiltinPrompts, prompt_set
from qdrift.runner import padded_prompts
from qdrift.stages import quantize as quantize_mod
from qdrift.stages.context import RunContext

from .conftest import CONF, FAST, compose_cfg
from .test_stage_keys import ALL, BELOW_QUANT, changed, stage_keys

TINY = ["model=tiny_pixart", "eval=smoke", "logger=none"]
QUANTS = sorted(p.stem for p in (Path(CONF) / "quant").glob("*.yaml"))
IMAGES = {"fp", "quant_images", "qdrift"}


def four(cfg) -> tuple:
    return cfg.quant.seed, cfg.eval.split, cfg.seed, cfg.calib.seed


# --- the config -----------------------------------------------------------------------------------

def test_replicate_zero_is_the_default_config():
    default = compose_cfg()
    assert four(default) == (0, 0, 0, 1_000_000)   # the seeds of every committed result
    assert plain(compose_cfg(["replicate=0"])) == plain(default)


@pytest.mark.parametrize("quant", QUANTS)
def test_replicate_changes_all_four(quant):
    zero, one, two = (compose_cfg([f"quant={quant}", f"replicate={r}"]) for r in (0, 1, 2))
    assert four(one) == (1, 1, 10_000_000, 11_000_000)
    assert four(two) == (2, 2, 20_000_000, 21_000_000)
    assert all(a != b for a, b in zip(four(zero), four(one)))


def test_one_key_can_still_be_varied_alone():
    cfg = compose_cfg(["replicate=1", "quant.seed=0"])
    assert four(cfg) == (0, 1, 10_000_000, 11_000_000)


def test_every_quant_option_has_a_seed():
    for quant in QUANTS:
        raw = OmegaConf.load(Path(CONF) / "quant" / f"{quant}.yaml")
        assert "seed" in raw, quant


@pytest.mark.parametrize("replicate", range(5))
def test_replicates_pass_validation_with_disjoint_seed_ranges(replicate):
    validate(compose_cfg([*TINY, "quant=rtn_w4a8", f"replicate={replicate}"]))


@pytest.mark.parametrize("override,message", [
    ("replicate=-1", "replicate must be an integer >= 0, got -1"),
    ("replicate=abc", "replicate must be an integer >= 0, got 'abc'"),
    ("eval.split=-1", "eval.split must be an integer >= 0, got -1"),
    ("quant.seed=abc", "quant.seed must be an integer >= 0, got 'abc'"),
    ("replicate=1000000000000", "replicate=1000000000000 is too large: its block of seeds would pass 2**63"),
])
def test_bad_replicate_keys_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([*TINY, override]))
    assert message in str(err.value)


def test_ptq_seeds_follow_quant_seed_and_are_checked():
    # PTQ calibration image j: 6,000,000 + quant.seed * 10,000,000 + j; rtn_w4a8 runs 32 prompts.
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([*TINY, "quant=rtn_w4a8", "quant.seed=1", "seed=16000000"]))
    assert "PTQ calibration seeds [16000000, 16000032) overlap evaluation seeds" in str(err.value)
    validate(compose_cfg([*TINY, "quant=rtn_w4a8", "seed=16000000"]))          # quant.seed=0: [6000000, ...)
    validate(compose_cfg([*TINY, "quant=rtn_w4a8", "calib.seed=6000000", "corrector=none"]))
    with pytest.raises(ConfigError) as err:   # calib.seed no longer moves PTQ: its range can meet PTQ's
        validate(compose_cfg([*TINY, "quant=rtn_w4a8", "calib.seed=6000010"]))
    assert "overlap" in str(err.value)


def test_a_split_beyond_the_pool_is_refused_before_any_model_loads():
    # the builtin set has 1008 evaluation prompts: 126 splits of 8
    validate(compose_cfg([*TINY, "eval.split=125"]))
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg([*TINY, "eval.split=126"]))
    assert "eval.split=126 evaluates prompts [1008, 1016)" in str(err.value)
    assert "holds 126 disjoint splits of 8" in str(err.value)


# --- the keys ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,expected", [
    ("quant.seed=1", BELOW_QUANT),                     # the quantized model and all below it
    ("calib.seed=2000000", {"calib", "qdrift"}),       # Q-Drift statistics, not the quantized model
    ("eval.split=1", IMAGES),                          # the prompts of every image batch
    ("seed=7", IMAGES),                                # the noise of every image batch
    ("replicate=1", ALL),
])
def test_each_replicate_key_changes_exactly_what_depends_on_it(tmp_path, override, expected):
    assert changed(stage_keys(tmp_path), stage_keys(tmp_path, [override])) == expected


def _ctx(tmp_path, overrides=()):
    cfg = compose_cfg([*FAST, "quant=rtn_w4a8", "++quant.calib_prompts=4", *overrides], tmp_path)
    source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, tmp_path / "run", torch.device("cpu"), source.eval_prompts(int(cfg.eval.num_prompts)),
                     source)
    ctx.batch_prompts = padded_prompts(ctx)
    return ctx


def test_ptq_calibration_depends_on_quant_seed_not_calib_seed(tmp_path):
    base = _ctx(tmp_path)
    spec = quantize_mod.QuantSpec.from_config(base.cfg.quant)
    prompts, seed = quantize_mod.ptq_prompts(base, spec), quantize_mod.ptq_seed(base)
    assert seed == 6_000_000 and prompts == base.prompt_set.calib_prompts(4)   # replicate 0: as before

    other_calib = _ctx(tmp_path, ["calib.seed=2000000"])
    assert quantize_mod.ptq_seed(other_calib) == seed
    assert quantize_mod.ptq_prompts(other_calib, spec) == prompts

    other_quant = _ctx(tmp_path, ["quant.seed=1"])
    spec1 = quantize_mod.QuantSpec.from_config(other_quant.cfg.quant)
    assert quantize_mod.ptq_seed(other_quant) == 16_000_000
    assert quantize_mod.ptq_prompts(other_quant, spec1) != prompts
    assert quantize_mod.ptq_prompts(other_quant, spec1) == quantize_mod.ptq_prompts(_ctx(tmp_path, ["quant.seed=1"]),
                                                                                     spec1)   # seeded: repeatable


# --- the prompts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [BuiltinPrompts, BenchPrompts])
def test_splits_are_disjoint_and_split_zero_is_the_old_list(cls):
    n = 20
    splits = [cls(start=s * n).eval_prompts(n) for s in range(5)]
    assert all(len(set(p)) == n for p in splits)
    assert len(set().union(*splits)) == 5 * n
    assert splits[0] == cls().eval_prompts(n)
    if cls is BenchPrompts:
        from qdrift.bench import captions

        assert splits[0] == captions("eval", n)   # the prompts of before


def test_the_run_evaluates_its_split(tmp_path):
    zero, one = _ctx(tmp_path), _ctx(tmp_path, ["eval.split=1"])
    assert len(one.prompts) == 4 and not set(one.prompts) & set(zero.prompts)
    assert one.prompts == BuiltinPrompts().eval_prompts(8)[4:]
    assert one.batch_prompts[:4] == one.prompts


def test_mjhq_split_takes_its_own_ids_and_references(tmp_path):
    root = tmp_path / "mjhq"
    root.mkdir()
    meta = {f"id{i:02d}": {"prompt": f"prompt {i}", "category": "people"} for i in range(10)}
    (root / "meta_data.json").write_text(json.dumps(meta))
    e = OmegaConf.create({"prompt_set": "mjhq", "mjhq_dir": str(root), "eval_split": 6, "num_prompts": 3,
                          "split": 1})
    source = prompt_set(e)
    assert source.eval_prompts(3) == ["prompt 3", "prompt 4", "prompt 5"]
    assert source.reference_path(0) == root / "people" / "id03.jpg"
    assert source.calib_prompts(2) == ["prompt 6", "prompt 7"]
    drawn = source.calib_prompts(3, seed=1)
    assert set(drawn) <= {f"prompt {i}" for i in range(6, 10)} and len(set(drawn)) == 3
    with pytest.raises(ValueError):
        prompt_set(OmegaConf.merge(e, {"split": 2})).eval_prompts(3)


def test_references_are_keyed_by_the_split(tmp_path, monkeypatch):
    """FID references are rendered per prompt: another split has its own reference set."""
    from qdrift.cache import atomic_save_image
    from qdrift.prompts import to_pil
    from qdrift.stages import evaluate as evaluate_mod

    def fake_render(self, indices, prompts, out_dir, resolution):
        for i in indices:
            atomic_save_image(to_pil(torch.zeros(3, 8, 8)), out_dir / f"{i}.png")

    monkeypatch.setattr(BenchPrompts, "write_references", fake_render)
    made = []
    for split in (0, 1):
        e = OmegaConf.create({"prompt_set": "bench", "reference": "rendered", "num_prompts": 2, "split": split})
        source = prompt_set(e)
        ctx = SimpleNamespace(cfg=OmegaConf.create({"eval": e, "model": {"resolution": 8}}),
                              prompts=source.eval_prompts(2), prompt_set=source, cache_dir=tmp_path / "cache",
                              run_dir=tmp_path / f"run{split}")
        evaluate_mod.reference_dir(ctx)
        made.append(ctx.prompts)
    assert len([d for d in (tmp_path / "cache" / "references").iterdir() if d.is_dir()]) == 2
    assert not set(made[0]) & set(made[1])
