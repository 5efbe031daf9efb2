"""Tiny randomly initialised pipelines of the real models' classes, built in code (no download).

Tests use them to exercise the real loading, quantization and sampling paths of every family
(the way diffusers' own tests do); before the bench models existed, the runner's default too.
"""
from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    T5Config,
    T5EncoderModel,
)

from .tokenizers import word_level_tokenizer

TINY_WORDS = (
    "a an the one two three small large big red green blue yellow purple orange white black circle square "
    "triangle star cross ring above below left right of on and with background cat dog photo"
).split()
MAX_TOKENS = 16


def _tokenizer():
    return word_level_tokenizer(TINY_WORDS, MAX_TOKENS)


def _vae(latent_channels: int = 4) -> AutoencoderKL:
    # Two resolution levels: 32px images <-> 16px latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.0,
    )


def _t5(d_model: int = 32) -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=len(TINY_WORDS) + 8, d_model=d_model, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg)


def _clip(hidden: int = 32, projection: bool = False):
    cfg = CLIPTextConfig(
        vocab_size=len(TINY_WORDS) + 8, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=hidden, pad_token_id=0,
        bos_token_id=2, eos_token_id=3, hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def tiny_pixart() -> PixArtSigmaPipeline:
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
        caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=_tokenizer(), text_encoder=_t5(32), vae=_vae(), transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _unet(cross_attention_dim: int, sdxl: bool, pooled_dim: int = 0) -> UNet2DConditionModel:
    extra = dict(
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + pooled_dim,
    ) if sdxl else {}
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=sdxl, **extra,
    )


def tiny_sd() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=_clip(32), tokenizer=_tokenizer(), unet=_unet(32, sdxl=False),
        scheduler=EulerDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    # SDXL concatenates both encoders' hidden states: 16 + 16 = 32 = cross_attention_dim.
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_clip(16), text_encoder_2=_clip(16, projection=True), tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(), unet=_unet(32, sdxl=True, pooled_dim=16), scheduler=EulerDiscreteScheduler(),
    )


def tiny_flux() -> FluxPipeline:
    # Latents are packed 2x2: 4 latent channels -> 16 transformer channels.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(), text_encoder=_clip(32), tokenizer=_tokenizer(),
        text_encoder_2=_t5(32), tokenizer_2=_tokenizer(), transformer=transformer,
    )


def tiny_sana() -> SanaPipeline:
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1],
        downsample_block_type="conv", upsample_block_type="interpolate", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,
    )
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=16,
    )
    encoder = Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=64, max_position_embeddings=64,
        model_type="gemma2", num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2,
        vocab_size=len(TINY_WORDS) + 8, attn_implementation="eager",
    ))
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    )
    return SanaPipeline(tokenizer=_tokenizer(), text_encoder=encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)


BUILDERS = {"pixart": tiny_pixart, "sd": tiny_sd, "sdxl": tiny_sdxl, "flux": tiny_flux, "sana": tiny_sana}


def build_tiny(family: str, seed: int = 0):
    """A tiny random pipeline of `family`, identical for the same seed."""
    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for model family {family!r}; known: {sorted(BUILDERS)}")
    torch.manual_seed(seed)
    pipe = BUILDERS[family]()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
