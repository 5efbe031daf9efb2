"""What each bench pipeline feeds its denoiser, restated for training on pre-tokenised batches.

Training must see exactly the inputs sampling will: PixArt masks T5's padding and passes the mask on;
StableDiffusion reads CLIP's last hidden state without a mask; FLUX reads CLIP's pooled output and T5's
unmasked hidden states, on 2x2-packed latents with (0, row, col) image ids. A test checks these against
each pipeline's own `encode_prompt`.
"""
from __future__ import annotations

import torch
from diffusers import FluxPipeline



def encode(name: str, encoders: dict[str, torch.nn.Module], ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Denoiser keyword arguments for token ids, as pipeline `name` computes them."""
    if name == "bench_dit":
        return dict(encoder_hidden_states=encoders["text_encoder"](ids, attention_mask=mask)[0],
                    encoder_attention_mask=mask)
    if name == "bench_unet":
        return dict(encoder_hidden_states=encoders["text_encoder"](ids)[0])
    if name == "bench_flow":
        seq = encoders["text_encoder_2"](ids)[0]
        return dict(pooled_projections=encoders["text_encoder"](ids).pooler_output, encoder_hidden_states=seq,
                    txt_ids=torch.zeros(seq.shape[1], 3, device=seq.device, dtype=seq.dtype))
    raise ValueError(f"unknown bench generator {name!r}")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> FLUX's packed [B, H/2 * W/2, 4C]."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack` for latents of `height` x `width`."""
    b, n, c4 = packed.shape
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def predict(name: str, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    """The raw denoiser output. Epsilon models take integer-scale timesteps t in [0, 1000); the flow
    model takes packed latents and sigma in [0, 1] (FluxPipeline passes timestep / 1000)."""
    if name == "bench_dit":
        return denoiser(x_t, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                        return_dict=False, **cond)[0]
    if name == "bench_unet":
        return denoiser(x_t, t, return_dict=False, **cond)[0]
    side = int(round(x_t.shape[1] ** 0.5))
    img_ids = FluxPipeline._prepare_latent_image_ids(x_t.shape[0], side, side, x_t.device, x_t.dtype)
    return denoiser(hidden_states=x_t, timestep=t, img_ids=img_ids, guidance=None, return_dict=False, **cond)[0]
