"""Architectures of the bench models (full size and --tiny), their schedulers and sampling defaults.

One vocabulary and tokenizer (captions.vocabulary) serve every text tower. Each generator owns its
text encoder(s), trained jointly with it from scratch (no shared encoder: each pipeline class reads
its encoder differently, e.g. PixArt masks T5's padding, FLUX does not).
"""
from __future__ import annotations

import math

from .grammar import MAX_TOKENS

GENERATORS = ("bench_dit", "bench_unet", "bench_flow")
PIPELINE = {"bench_dit": "PixArtSigmaPipeline", "bench_unet": "StableDiffusionPipeline", "bench_flow": "FluxPipeline"}
DENOISER = {"bench_dit": "transformer", "bench_unet": "unet", "bench_flow": "transformer"}
# Pipeline slot -> encoder kind.
TEXT_ENCODERS = {
    "bench_dit": {"text_encoder": "t5"},
    "bench_unet": {"text_encoder": "clip_text"},
    "bench_flow": {"text_encoder": "clip_text", "text_encoder_2": "t5"},
}
PREDICTION = {"bench_dit": "epsilon", "bench_unet": "epsilon", "bench_flow": "flow"}

# DDPM linear betas for both epsilon models: at 16x16 latents SD's scaled-linear schedule leaves
# 7% of the signal at t=999 (a mean-colour leak); linear leaves 0.6%.
# steps_offset=1 only silences StableDiffusionPipeline's legacy check; "trailing"/"linspace" ignore it.
_BETAS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, steps_offset=1)
FLOW_SHIFT = 1.0     # 64 image tokens: no resolution shift needed; training samples t logit-normally
# FluxPipeline always passes a resolution shift mu to set_timesteps. Dynamic shifting with
# base_shift = max_shift = log(FLOW_SHIFT) makes exp(mu) = FLOW_SHIFT at every resolution, so a flow-mode
# DPMSolverMultistepScheduler built from this config (it requires dynamic, exponential shifting) and
# flow Euler both sample with the shift the model was trained for.
_FLOW_MU = math.log(FLOW_SHIFT)
SCHEDULERS = {
    "bench_dit": ("DPMSolverMultistepScheduler", dict(
        _BETAS, prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace")),
    "bench_unet": ("EulerDiscreteScheduler", dict(_BETAS, prediction_type="epsilon", timestep_spacing="trailing")),
    "bench_flow": ("FlowMatchEulerDiscreteScheduler", dict(
        num_train_timesteps=1000, shift=FLOW_SHIFT, use_dynamic_shifting=True, time_shift_type="exponential",
        base_shift=_FLOW_MU, max_shift=_FLOW_MU, base_image_seq_len=64, max_image_seq_len=4096)),
}
# Sampling defaults; they match conf/model/bench_*.yaml.
SAMPLING = {
    "bench_dit": dict(steps=20, guidance=4.0),
    "bench_unet": dict(steps=30, guidance=4.0),
    "bench_flow": dict(steps=20, guidance=4.0),
}
RESOLUTION = 64

FULL = {
    # 64px -> 16x16x4 latents (three block levels); the decoder runs once per generated image on CPU.
    "vae": dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8),
    "t5": dict(d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4),
    "clip_text": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
    # The generators are sized by CPU cost (~130-170 MFLOP per image and step, see README).
    "bench_dit": dict(num_layers=4, num_attention_heads=4, attention_head_dim=32),
    "bench_unet": dict(block_out_channels=(32, 64, 64), attention_head_dim=32, norm_num_groups=16),
    "bench_flow": dict(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=32),
    "eval_clip": dict(embed_dim=128,
                      vision=dict(layers=4, width=128, head_width=32, patch_size=8),
                      text=dict(layers=3, width=128, heads=4)),
}
TINY = {
    "vae": dict(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=4),
    "t5": dict(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
    "clip_text": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    "bench_dit": dict(num_layers=1, num_attention_heads=2, attention_head_dim=8),
    "bench_unet": dict(block_out_channels=(8, 16, 16), attention_head_dim=8, norm_num_groups=8),
    "bench_flow": dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=8),
    "eval_clip": dict(embed_dim=16,
                      vision=dict(layers=1, width=16, head_width=8, patch_size=16),
                      text=dict(layers=1, width=16, heads=2)),
}
SIZES = {"full": FULL, "tiny": TINY}


def vae_config(arch: dict) -> dict:
    n = len(arch["block_out_channels"])
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION, shift_factor=0.0,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n, **arch)


def t5_config(arch: dict, vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, relative_attention_num_buckets=16, relative_attention_max_distance=MAX_TOKENS,
                pad_token_id=0, eos_token_id=3, decoder_start_token_id=0, dropout_rate=0.0, **arch)


def clip_text_config(arch: dict, vocab_size: int) -> dict:
    return dict(vocab_size=vocab_size, max_position_embeddings=MAX_TOKENS, projection_dim=arch["hidden_size"],
                pad_token_id=0, bos_token_id=2, eos_token_id=3, hidden_act="gelu", **arch)


def denoiser_config(name: str, sizes: dict) -> dict:
    arch = sizes[name]
    if name == "bench_dit":
        inner = arch["num_attention_heads"] * arch["attention_head_dim"]
        return dict(sample_size=RESOLUTION // 4, patch_size=2, in_channels=4, out_channels=4,
                    caption_channels=sizes["t5"]["d_model"], cross_attention_dim=inner, attention_bias=True,
                    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                    norm_elementwise_affine=False, norm_eps=1e-6, **arch)
    if name == "bench_unet":
        # SDXL-style: no attention at the highest resolution, linear projections in the transformer blocks.
        return dict(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    cross_attention_dim=sizes["clip_text"]["hidden_size"], use_linear_projection=True, **arch)
    if name == "bench_flow":
        head = arch["attention_head_dim"]
        # Rotary dims per id axis (text index, row, column), even and summing to the head dim: 32 -> (8, 12, 12).
        rope_t = 2 * (head // 8)
        rope_r = 2 * ((head - rope_t) // 4)
        rope = (rope_t, rope_r, head - rope_t - rope_r)
        return dict(patch_size=1, in_channels=16, guidance_embeds=False, axes_dims_rope=rope,
                    joint_attention_dim=sizes["t5"]["d_model"], pooled_projection_dim=sizes["clip_text"]["hidden_size"],
                    **arch)
    raise ValueError(f"unknown bench generator {name!r}; known: {GENERATORS}")


def eval_clip_config(arch: dict, vocab_size: int) -> dict:
    return dict(
        embed_dim=arch["embed_dim"],
        vision_cfg=dict(image_size=RESOLUTION, **arch["vision"]),
        # Word-level tokenizer: <eos> is id 3 (not the largest id), so pool at the first <eos>.
        text_cfg=dict(context_length=MAX_TOKENS, vocab_size=vocab_size, pad_id=0, eos_id=3, pool_type="eos",
                      **arch["text"]),
    )
