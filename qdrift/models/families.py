"""Model families: what a diffusers pipeline of each architecture looks like to qdrift.

A family names the pipeline class, where its denoiser lives, how its latents are laid out and
which call arguments it needs. Real models and bench models of the same class share a family,
so they share every code path (quantizer module selection, statistics layout, sampling).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str          # diffusers class name
    denoiser_attr: str           # "transformer" or "unet"
    latent_layout: str           # "image": (B, C, H, W); "packed": (B, N, C*4) 2x2 patches (FLUX)
    guidance_arg: str = "guidance_scale"   # the __call__ argument that sets classifier-free guidance
    call_kwargs: dict = field(default_factory=dict)  # always passed to __call__


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("pixart", "PixArtSigmaPipeline", "transformer", "image",
               call_kwargs={"use_resolution_binning": False, "clean_caption": False}),
        Family("sd", "StableDiffusionPipeline", "unet", "image"),
        Family("sdxl", "StableDiffusionXLPipeline", "unet", "image"),
        Family("flux", "FluxPipeline", "transformer", "packed"),
        Family("sana", "SanaPipeline", "transformer", "image",
               call_kwargs={"use_resolution_binning": False, "clean_caption": False,
                            "complex_human_instruction": None}),
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def denoiser_of(pipe):
    """The network that PTQ quantizes: the pipeline's transformer or UNet."""
    return getattr(pipe, "transformer", None) or pipe.unet
