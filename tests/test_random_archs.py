"""model.source=random: the paper's real architectures from their published configs, with random weights.

The full configs are checked by parameter count on the meta device (nothing allocated) against the
published model sizes; the reduced ones (same classes and blocks, tiny widths) run the whole runner
on the CPU: build, SVDQuant/MixDQ, Q-Drift calibration, generation and evaluation.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from omegaconf import open_dict

from qdrift.config import ConfigError, validate
from qdrift.models import identity, random_arch
from qdrift.models.families import denoiser_of, get_family
from qdrift.models.loaders import ModelUnavailable, check_available, load_pipeline

from .conftest import compose_cfg

# Model config -> its architecture file (conf/model/<model>.yaml `arch`).
ARCHS = {"pixart": "pixart_sigma_xl", "sdxl": "sdxl", "sdxl_turbo": "sdxl", "flux_dev": "flux_dev",
         "flux_schnell": "flux_schnell", "sana": "sana_1600m_1024px"}
# Published parameter counts (model cards and papers): PixArt-Sigma XL/2 0.61B, SDXL UNet 2.57B,
# FLUX.1 12B (11.9B), SANA 1.6B, T5 v1.1 XXL encoder 4.76B, Gemma-2 2B 2.61B with embeddings,
# CLIP ViT-L/14 text 123M, OpenCLIP ViT-bigG/14 text 695M.
T5_XXL, CLIP_L, BIGG = 4.76e9, 123e6, 695e6
PUBLISHED = {
    "pixart_sigma_xl": {"transformer": 0.61e9, "text_encoder": T5_XXL},
    "sdxl": {"unet": 2.57e9, "text_encoder": CLIP_L, "text_encoder_2": BIGG},
    "flux_dev": {"transformer": 11.9e9, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL},
    "flux_schnell": {"transformer": 11.9e9, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL},
    "sana_1600m_1024px": {"transformer": 1.6e9, "text_encoder": 2.61e9},
}
RESOLUTION = 32   # a multiple of every family's VAE downsampling x patch (config.RESOLUTION_MULTIPLE)


def random_cfg(model: str, *overrides, tmp_path=None):
    return compose_cfg([f"model={model}", "model.source=random", "model.arch_size=reduced",
                        f"model.resolution={RESOLUTION}", "model.svdquant_rank=4", *overrides], tmp_path)


def test_every_paper_model_names_a_shipped_architecture():
    assert set(ARCHS.values()) == set(random_arch.arch_names()) == set(PUBLISHED)
    for model, arch in ARCHS.items():
        cfg = compose_cfg([f"model={model}"])
        assert (cfg.model.source, cfg.model.arch, cfg.model.arch_size) == ("hub", arch, "full")
        spec = random_arch.load_arch(arch, variant=cfg.model.get("arch_variant"))
        assert spec["pipeline"] == get_family(cfg.model.family).pipeline_class
        assert spec["hub_id"] == cfg.model.hub_id   # the configs are those of the checkpoint the model names


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_full_configs_have_the_published_sizes(arch):
    spec = random_arch.load_arch(arch)
    for slot, comp in spec["components"].items():
        assert comp.get("source", "").startswith(spec["hub_id"]) or comp["library"] == "local", slot
    for slot, published in PUBLISHED[arch].items():
        count = random_arch.parameter_count(spec["components"][slot])
        assert abs(count - published) <= 0.1 * published, (slot, count)


def test_sdxl_turbo_is_sdxl_with_its_own_scheduler():
    base, turbo = random_arch.load_arch("sdxl"), random_arch.load_arch("sdxl", variant="turbo")
    sched = turbo["components"]["scheduler"]
    assert (sched["class"], sched["config"]["timestep_spacing"]) == ("EulerAncestralDiscreteScheduler", "trailing")
    assert base["components"]["scheduler"]["config"]["timestep_spacing"] == "leading"
    assert turbo["components"]["text_encoder_2"] == base["components"]["text_encoder_2"]
    unet = {k: v for k, v in turbo["components"]["unet"]["config"].items() if k != "sample_size"}
    assert unet == {k: v for k, v in base["components"]["unet"]["config"].items() if k != "sample_size"}


@pytest.mark.parametrize("model", sorted(ARCHS))
def test_reduced_pipeline_has_the_real_classes_and_structure(model, one_thread):
    cfg = random_cfg(model)
    validate(cfg, inputs=True)
    pipe = load_pipeline(cfg.model, torch.device("cpu"))
    arch = random_arch.load_arch(cfg.model.arch, "reduced", cfg.model.get("arch_variant"))
    for slot, spec in arch["components"].items():
        comp = getattr(pipe, slot)
        if spec["library"] != "local":
            assert type(comp).__name__ == spec["class"], slot
        else:   # every token id indexes its encoder's embedding
            assert len(comp) <= arch["components"][spec["encoder"]]["config"]["vocab_size"]
    denoiser = denoiser_of(pipe)
    config = arch["components"][get_family(cfg.model.family).denoiser_attr]["config"]
    if hasattr(denoiser, "transformer_blocks"):
        assert len(denoiser.transformer_blocks) == config["num_layers"]
    if hasattr(denoiser, "single_transformer_blocks"):
        assert len(denoiser.single_transformer_blocks) == config["num_single_layers"]
    if hasattr(denoiser, "down_blocks"):
        assert [b.resnets[0].out_channels for b in denoiser.down_blocks] == config["block_out_channels"]
        deepest = denoiser.down_blocks[-1].attentions[0].transformer_blocks
        assert len(deepest) == config["transformer_layers_per_block"][-1]
    # Same config, same weights: the seed decides them.
    again = load_pipeline(cfg.model, torch.device("cpu"))
    assert torch.equal(next(denoiser_of(again).parameters()), next(denoiser.parameters()))


def test_unknown_arch_or_size_is_refused_before_loading():
    cfg = random_cfg("pixart")
    with open_dict(cfg):
        cfg.model.arch = "pixart_gamma"
    with pytest.raises(ModelUnavailable, match=r"not a shipped architecture.*'flux_dev'"):
        check_available(cfg.model)
    with pytest.raises(ConfigError, match="model.arch=.pixart_gamma. is not a shipped architecture"):
        validate(cfg)
    cfg = random_cfg("pixart", "model.arch_size=tiny")
    with pytest.raises(ModelUnavailable, match=r"model.arch_size='tiny' is not an option.*'full', 'reduced'"):
        check_available(cfg.model)
    with pytest.raises(ConfigError, match="model.arch_size='tiny' is not an option"):
        validate(cfg, inputs=False)
    cfg = random_cfg("pixart", "model.arch=sdxl")   # an architecture of another family
    with pytest.raises(ModelUnavailable, match="builds a StableDiffusionXLPipeline"):
        check_available(cfg.model)


def test_weights_identity_is_the_arch_file_size_and_seed():
    cfg = random_cfg("flux_dev")
    ident = identity.weights_identity(cfg.model)
    path = random_arch.ARCH_DIR / "flux_dev.json"
    assert ident["arch_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (ident["arch_size"], ident["seed"]) == ("reduced", 0)
    with open_dict(cfg):
        cfg.model.seed = 1
    assert identity.weights_identity(cfg.model)["seed"] == 1
    assert identity.weights_identity(random_cfg("flux_dev", "model.arch_size=full").model) != ident


RUNS = [("pixart", "svdquant_w3a4"), ("sdxl", "svdquant_w3a4"), ("sdxl_turbo", "svdquant_w3a4"),
        ("flux_dev", "svdquant_w3a4"), ("flux_schnell", "svdquant_w3a4"), ("sana", "svdquant_w3a4"),
        # MixDQ's sensitivity search runs the model once per layer and bit option: ~40 s on CPU
        pytest.param("sdxl_turbo", "mixdq_w4a8", marks=pytest.mark.slow)]
LIGHT_QUANT = {  # the quantizers' own calibration, cut to what a 2-step tiny run needs
    "svdquant_w3a4": ["quant.calib_prompts=2", "quant.calib_tokens=256", "quant.lowrank_iters=3",
                      "quant.alpha_grid=4", "model.svdquant_rank=4"],   # rank < the reduced widths of 32
    "mixdq_w4a8": ["quant.calib_prompts=2", "quant.sensitivity_prompts=1"],
}


@pytest.mark.parametrize("model,quant", RUNS)
def test_reduced_architecture_runs_one_quantized_corrected_step(model, quant, tmp_path, monkeypatch, one_thread):
    """Builds at a reduced width on CPU and runs two quantized, corrected steps end to end (~1-3 s)."""
    from qdrift import runner
    from qdrift.stages import build

    built = {}

    def spy(model_cfg, device):
        built["pipe"] = load_pipeline(model_cfg, device)
        return built["pipe"]

    monkeypatch.setattr(build, "load_pipeline", spy)
    cfg = random_cfg(model, f"quant={quant}", *LIGHT_QUANT[quant], "corrector=qdrift", "sampler.steps=2",
                     "calib.num_runs=1", "calib.batch_size=1", "eval=smoke", "eval.num_prompts=2",
                     "batch_size=2", "logger=none", "device=cpu", tmp_path=tmp_path)
    metrics = runner.run(cfg, tmp_path / "run")

    arch = random_arch.load_arch(cfg.model.arch, "reduced", cfg.model.get("arch_variant"))
    denoiser = denoiser_of(built["pipe"])
    assert type(denoiser).__name__ == arch["components"][get_family(cfg.model.family).denoiser_attr]["class"]
    assert set(metrics["variants"]) == {"fp", "quant", "qdrift"}
    for variant in ("fp", "quant", "qdrift"):
        assert sorted(p.name for p in (tmp_path / "run/images" / variant).glob("*.png")) == ["0.png", "1.png"]
    assert (tmp_path / "run/images/fp/0.png").read_bytes() != (tmp_path / "run/images/quant/0.png").read_bytes()
    assert metrics["variants"]["quant"]["psnr_vs_fp"] < 60
    # The arch file's digest keys every cached artifact of the run.
    digest = hashlib.sha256((random_arch.ARCH_DIR / f"{cfg.model.arch}.json").read_bytes()).hexdigest()
    manifests = [p.read_text() for p in (tmp_path / "cache").rglob("manifest.json")]
    assert len(manifests) >= 4 and all(digest in m for m in manifests)   # quant, calib, images


def test_reduced_size_with_the_papers_svdquant_rank_is_refused_before_loading():
    from qdrift.config import ConfigError

    cfg = compose_cfg(["model=pixart", "model.source=random", "model.arch_size=reduced", "quant=svdquant_w3a4"])
    with pytest.raises(ConfigError, match="add model.svdquant_rank=4"):
        validate(cfg, inputs=False)
