"""Training losses of the bench models (one function or class per model kind)."""
from __future__ import annotations

import diffusers
import torch
import torch.nn.functional as F

from . import configs
from .conditioning import encode, pack, predict

KL_WEIGHT = 1e-4           # per latent element; keeps the posterior tame without blurring flat shapes
CFG_DROPOUT = 0.1          # fraction of captions replaced by "" so classifier-free guidance has an unconditional model
LOGIT_NORMAL = (0.0, 1.0)  # flow-matching sigma ~ sigmoid(N(m, s)) (SD3), then shifted by configs.FLOW_SHIFT


def vae_loss(vae, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """L1 + L2 reconstruction of images in [-1, 1] through a posterior sample, plus a small KL."""
    posterior = vae.encode(images).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=images.device)
    rec = vae.decode(z).sample
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return F.l1_loss(rec, images) + F.mse_loss(rec, images) + KL_WEIGHT * kl


def clip_loss(model, images: torch.Tensor, ids: torch.Tensor, hard_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; image->text also competes with each image's swapped captions.

    images: normalised [B, 3, H, W]; ids: [B, L]; hard_ids: [B, K, L] one-attribute swaps of each caption.
    """
    b, k, length = hard_ids.shape
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(torch.cat([ids, hard_ids.reshape(b * k, length)]), normalize=True)
    pos, neg = txt[:b], txt[b:].view(b, k, -1)
    scale = model.logit_scale.exp().clamp(max=100)
    logits = scale * img @ pos.T
    hard = scale * torch.einsum("bd,bkd->bk", img, neg)
    target = torch.arange(b, device=images.device)
    return 0.5 * (F.cross_entropy(torch.cat([logits, hard], dim=1), target) + F.cross_entropy(logits.T, target))


class DenoisingLoss:
    """Epsilon-prediction DDPM loss (bench_dit, bench_unet) or rectified-flow velocity loss (bench_flow),
    on latents already scaled by the VAE's scaling factor, in the schedule the model's sampler uses."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.flow = name, configs.PREDICTION[name] == "flow"
        cls, kwargs = configs.SCHEDULERS[name]
        scheduler = getattr(diffusers, cls).from_config(kwargs)
        self.num_train_timesteps = kwargs["num_train_timesteps"]
        if not self.flow:
            self.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.shift = kwargs.get("shift", 1.0)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) with x_t = a * x0 + s * noise, for the timesteps the denoiser receives."""
        if self.flow:
            return 1 - t, t                                    # t = sigma in [0, 1]
        ab = self.alphas_cumprod[t.round().long()]
        return ab.sqrt(), (1 - ab).sqrt()

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0 if self.flow else noise

    def ideal_output(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """What a perfect denoiser outputs when the data is the single point x0 (tests use it as an oracle)."""
        a, s = (c.view(-1, *[1] * (x_t.dim() - 1)) for c in self.coefficients(t.expand(x_t.shape[0])))
        return self.target(x0, (x_t - a * x0) / s)

    def __call__(self, denoiser, encoders: dict, latents: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                 gen: torch.Generator) -> torch.Tensor:
        b, dev = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=gen, device=dev)
        cond = encode(self.name, encoders, ids, mask)
        if self.flow:
            m, s = LOGIT_NORMAL
            t = torch.sigmoid(m + s * torch.randn(b, generator=gen, device=dev))
            t = self.shift * t / (1 + (self.shift - 1) * t)
            latents, noise = pack(latents), pack(noise)
        else:
            t = torch.randint(0, self.num_train_timesteps, (b,), generator=gen, device=dev)
        a, s = (c.view(-1, *[1] * (latents.dim() - 1)) for c in self.coefficients(t))
        out = predict(self.name, denoiser, a * latents + s * noise, t, cond)
        return F.mse_loss(out.float(), self.target(latents, noise))


def drop_captions(ids: torch.Tensor, mask: torch.Tensor, empty_ids: torch.Tensor, empty_mask: torch.Tensor,
                  gen: torch.Generator, p: float = CFG_DROPOUT) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a fraction `p` of captions by the empty caption (the pipelines' negative prompt "")."""
    drop = torch.rand(ids.shape[0], generator=gen, device=ids.device) < p
    return torch.where(drop[:, None], empty_ids, ids), torch.where(drop[:, None], empty_mask, mask)
