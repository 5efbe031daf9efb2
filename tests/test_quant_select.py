"""Module selection: semantic keys and per-family skip lists; quant config specs."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from qdrift.models.families import denoiser_of
from qdrift.models.tiny import build_tiny
from qdrift.quant import QuantSpec, select_layers
from qdrift.quant.select import ACT_LOWER_BOUNDS, key_of

CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"


@pytest.fixture(scope="module")
def denoisers():
    return {f: denoiser_of(build_tiny(f)) for f in ("pixart", "sd", "sdxl", "flux", "sana")}


@pytest.mark.parametrize("family", ["pixart", "sd", "sdxl", "flux", "sana"])
def test_every_layer_gets_a_semantic_key(denoisers, family):
    sites = select_layers(denoisers[family], family)
    assert sites and not [s.name for s in sites if s.key == "other"]
    by_key = {}
    for s in sites:
        by_key.setdefault(s.key, set()).add(s.role)
    # embeddings, embedders, final projection stay 16-bit everywhere; attention and FFN are quantized
    for key in ("embed", "time_embed", "final"):
        assert by_key[key] == {"fp16"}, key
    assert by_key["attn_qkv"] == by_key["ffn_up"] == {"quant"}
    if family == "flux":
        assert by_key["adanorm"] == {"weight_only"}         # FLUX: adaLN weights only
    elif "adanorm" in by_key:                               # PixArt/SANA: adaln_single / time_embed.linear
        assert by_key["adanorm"] == {"fp16"}


def test_family_specific_structure(denoisers):
    sd = {s.name: s for s in select_layers(denoisers["sd"], "sd")}
    assert sd["conv_in"].role == "fp16" and sd["down_blocks.0.downsamplers.0.conv"].role == "fp16"
    assert sd["down_blocks.1.attentions.0.proj_in"].key == "transformer_proj"
    conv1 = sd["down_blocks.0.resnets.0.conv1"]
    assert conv1.role == "quant" and conv1.kind == "conv" and conv1.act_lower_bound == ACT_LOWER_BOUNDS["SiLU"]
    # SD's FFN is GEGLU: the down projection's input is a gated product, not bounded below
    assert sd["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"].act_lower_bound is None
    assert sd["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].tokens_first

    pix = {s.name: s for s in select_layers(denoisers["pixart"], "pixart")}
    assert pix["transformer_blocks.0.ff.net.2"].act_lower_bound == ACT_LOWER_BOUNDS["GELU"]
    assert pix["transformer_blocks.0.ff.net.2"].group == "content"
    assert pix["transformer_blocks.0.attn1.to_q"].group == "quality"
    assert pix["adaln_single.linear"].role == "fp16" and pix["proj_out"].key == "final"

    flux = {s.name: s for s in select_layers(denoisers["flux"], "flux")}
    assert flux["single_transformer_blocks.0.proj_out"].key == "single_out"
    assert flux["norm_out.linear"].key == "final"

    sana = {s.name: s for s in select_layers(denoisers["sana"], "sana")}
    assert sana["transformer_blocks.0.ff.conv_inverted"].kind == "pointwise"
    assert sana["transformer_blocks.0.ff.conv_depth"].role == "fp16"      # depthwise: not a GEMM


def test_key_table_and_errors(denoisers):
    assert key_of("proj_out") == "final"
    assert key_of("up_blocks.0.attentions.1.proj_out") == "transformer_proj"
    assert key_of("something.new") == "other"
    with pytest.raises(ValueError, match="no quantization selection rules"):
        select_layers(denoisers["pixart"], "unet3d")
    with pytest.raises(ValueError, match="unknown semantic keys"):
        select_layers(denoisers["pixart"], "pixart", ("attention",))
    extra = select_layers(denoisers["pixart"], "pixart", ("cross_kv",))
    assert {s.role for s in extra if s.key == "cross_kv"} == {"fp16"}


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_quant_yaml_builds_a_spec(path):
    cfg = OmegaConf.load(path)
    spec = QuantSpec.from_config(cfg)
    assert spec.name == path.stem == cfg.name and spec.method == cfg.method
    if spec.method == "svdquant":
        assert spec.calib_prompts == 128 and spec.svdquant.rank == 32
        assert spec.weights.bits == cfg.w_bits and spec.acts.granularity == "group"
    if spec.method == "mixdq":
        assert spec.calib_prompts == 32 and spec.mixdq.w_options == (2, 4, 8) and spec.mixdq.bos_aware
    if spec.method in ("mixdq", "rtn"):
        assert spec.weights.granularity == "channel" and spec.acts.granularity == "tensor"


def test_spec_errors_and_fingerprint():
    base = dict(name="x", method="svdquant", w_bits=4, a_bits=4, calib_prompts=2)
    with pytest.raises(ValueError, match="unknown quantization method"):
        QuantSpec.from_config({**base, "method": "gptq"})
    with pytest.raises(ValueError, match="not supported"):
        QuantSpec.from_config({**base, "w_bits": 12})
    with pytest.raises(ValueError, match="not used by method"):
        QuantSpec.from_config({**base, "keep_fp_acts": 2})
    with pytest.raises(ValueError, match="unknown number format"):
        QuantSpec.from_config({**base, "format": "mxfp4"})
    with pytest.raises(ValueError, match="W4A4"):
        QuantSpec.from_config({**base, "format": "nvfp4", "w_bits": 3})
    a, b = QuantSpec.from_config(base), QuantSpec.from_config(base)
    assert a == b and a.fingerprint() == b.fingerprint()
    assert QuantSpec.from_config({**base, "calib_prompts": 3}).fingerprint() != a.fingerprint()
    assert QuantSpec.from_config({"name": "none", "method": "none"}).weights is None
