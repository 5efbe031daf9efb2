"""Every config group option composes and validates; whatever can be built offline is built."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import open_dict

from qdrift.config import ConfigError, validate
from qdrift.drift import DriftStatistics, make_corrector
from qdrift.models.loaders import ModelUnavailable, load_pipeline
from qdrift.models.tiny import build_tiny
from qdrift.quant import QuantSpec
from qdrift.samplers import SAMPLERS, make_scheduler

from .conftest import CONF, compose_cfg

GROUPS = {g: sorted(p.stem for p in (Path(CONF) / g).glob("*.yaml")) for g in
          ("model", "sampler", "quant", "corrector", "eval", "logger", "calib", "experiment")}
# The mission's options must all exist.
REQUIRED = {
    "model": {"pixart", "sdxl", "sdxl_turbo", "flux_dev", "flux_schnell", "sana", "bench_dit", "bench_unet", "bench_flow"},
    "sampler": {"euler", "euler_a", "flow_euler", "dpmpp", "ddim"},
    "quant": {"none", "rtn_w8a8", "svdquant_w4a4", "svdquant_w3a4", "svdquant_nvfp4", "mixdq_w4a8", "mixdq_w8a8"},
    "corrector": {"none", "qdrift", "ptqd", "d2dpm", "d2dpm_stochastic", "cumcomp"},
    "logger": {"wandb", "none"},
}


@pytest.mark.parametrize("group", sorted(REQUIRED))
def test_required_options_exist(group):
    assert REQUIRED[group] <= set(GROUPS[group])


def _compatible_sampler(model_cfg_name: str) -> str:
    cfg = compose_cfg([f"model={model_cfg_name}"])
    return cfg.sampler.name


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """No model in the Hugging Face cache, whatever this machine has downloaded."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("model", GROUPS["model"])
def test_every_model_composes_and_validates(model, empty_hub_cache):
    cfg = compose_cfg([f"model={model}"])
    hub = cfg.model.source == "hub"
    validate(cfg, inputs=not hub)
    if hub:  # real weights are not on this machine: refused up front, with the download command
        with pytest.raises(ConfigError, match=f"hf download {cfg.model.hub_id} --revision"):
            validate(cfg)
    assert cfg.sampler.name == cfg.model.sampler  # sampler=auto follows the model
    assert cfg.sampler.steps == cfg.model.steps


@pytest.mark.parametrize("quant", GROUPS["quant"])
def test_every_quant_option_builds_its_spec(quant):
    cfg = compose_cfg([f"quant={quant}"])
    validate(cfg)
    spec = QuantSpec.from_config(cfg.quant)
    assert spec.method == cfg.quant.method


@pytest.mark.parametrize("corrector", GROUPS["corrector"])
def test_every_corrector_option_instantiates(corrector):
    cfg = compose_cfg([f"corrector={corrector}"])
    validate(cfg)
    z = torch.zeros(4, 1, dtype=torch.float64)
    stats = DriftStatistics(z, z, z + 1, z + 0.1, z)
    for name, c in cfg.corrector.items():
        opts = {k: v for k, v in c.items() if k not in ("kind", "pooling")}
        assert make_corrector(c.kind, stats, **opts) is not None, name
    if corrector == "all":
        assert set(cfg.corrector) == {"qdrift", "qdrift_exact", "qdrift_plus", "ptqd", "d2dpm", "d2dpm_stochastic",
                                      "cumcomp"}


@pytest.mark.parametrize("group", ["eval", "logger", "calib", "experiment"])
def test_other_groups_compose(group):
    for option in GROUPS[group]:
        cfg = compose_cfg([f"{group}={option}"])
        # Paper experiments and MJHQ need real weights and data: their absence is tested in test_errors.py.
        validate(cfg, inputs=cfg.model.source != "hub" and cfg.eval.prompt_set != "mjhq")


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("family,prediction", [("pixart", "epsilon"), ("flux", "flow"), ("sana", "flow"), ("sd", "epsilon")])
def test_samplers_instantiate_for_compatible_models(sampler, family, prediction):
    if prediction not in SAMPLERS[sampler].predictions:
        with pytest.raises(ValueError, match="cannot run"):
            make_scheduler(sampler, build_tiny(family).scheduler, prediction)
        return
    sch = make_scheduler(sampler, build_tiny(family).scheduler, prediction)
    assert isinstance(sch, SAMPLERS[sampler].cls)
    sch.set_timesteps(5)
    assert len(sch.timesteps) == 5


def test_design_card_command_composes():
    cfg = compose_cfg(["model=pixart", "quant=svdquant_w3a4", "sampler=dpmpp", "calib.num_runs=5"])
    validate(cfg, inputs=False)
    assert (cfg.model.hub_id, cfg.quant.method, cfg.quant.w_bits, cfg.sampler.name) == (
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", "svdquant", 3, "dpmpp")


def test_unknown_group_option_lists_choices():
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as err:
        compose_cfg(["quant=svdquant_w2a2"])
    assert "svdquant_w3a4" in str(err.value)  # Hydra names the available options


@pytest.mark.parametrize("override,message", [
    ("calib.num_runs=0", "calib.num_runs (K) must be an integer >= 1"),
    ("calib.num_runs=-3", "calib.num_runs (K) must be an integer >= 1"),
    ("sampler.steps=0", "sampler.steps must be an integer >= 1"),
    ("batch_size=0", "batch_size must be an integer >= 1"),
    ("sampler.guidance=-1.0", "sampler.guidance must be a number >= 0"),
    ("sampler=flow_euler", "cannot run a epsilon-prediction model"),
    ("corrector.qdrift.mode=fancy", "corrector.qdrift.mode='fancy'"),
    ("corrector.qdrift.pooling=pixel", "corrector.qdrift.pooling='pixel'"),
    ("calib.seed=2", "calibration seeds"),
    ("logger.mode=sometimes", "logger.mode='sometimes'"),
    ("eval.num_prompts=0", "eval.num_prompts must be an integer >= 2"),
])
def test_bad_input_has_a_clear_message(override, message):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_input_fails_before_any_model_loads(tmp_path, monkeypatch):
    from qdrift import runner
    from qdrift.stages import build

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build, "load_pipeline", boom)
    cfg = compose_cfg(["calib.num_runs=0"], tmp_path)
    with pytest.raises(ConfigError):
        runner.run(cfg, tmp_path / "run")


def test_unwritable_output_dir_is_reported(tmp_path):
    from qdrift import runner

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    cfg = compose_cfg(["logger=none"], tmp_path)
    with open_dict(cfg):
        cfg.cache_dir = str(blocker / "cache")
    with pytest.raises(ConfigError, match="not writable"):
        runner.run(cfg, tmp_path / "run")


def test_hub_model_offline_fails_with_download_instructions(tmp_path):
    cfg = compose_cfg(["model=pixart"])
    with pytest.raises(ModelUnavailable) as err:
        load_pipeline(cfg.model, torch.device("cpu"))
    msg = str(err.value)
    assert "hf download PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --revision main" in msg and "model.local_path" in msg


@pytest.mark.parametrize("family", ["pixart", "sd", "sdxl", "flux", "sana"])
def test_hub_loader_reads_a_local_snapshot(tmp_path, family):
    """The real loading path (from_pretrained on a local dir, offline) with a tiny pipeline saved to disk."""
    model = {"pixart": "pixart", "sd": "bench_unet", "sdxl": "sdxl", "flux": "flux_dev", "sana": "sana"}[family]
    pipe = build_tiny(family)
    pipe.save_pretrained(tmp_path / "snap")
    cfg = compose_cfg([f"model={model}"])
    with open_dict(cfg):
        cfg.model.source = "hub"
        cfg.model.hub_id = cfg.model.get("hub_id") or "local/tiny"
        cfg.model.local_path = str(tmp_path / "snap")
    loaded = load_pipeline(cfg.model, torch.device("cpu"))
    assert type(loaded).__name__ == type(pipe).__name__
    a = dict(pipe.components[("transformer" if hasattr(pipe, "transformer") else "unet")].state_dict())
    b = loaded.components[("transformer" if hasattr(pipe, "transformer") else "unet")].state_dict()
    assert all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in a)
