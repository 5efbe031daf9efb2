"""A ready-made `calibrate(n)` for `quantize`: the pipeline on its own sampling trajectory.

The runner may pass its own callable; this one is what the tests and simple scripts use.
Every call with the same n draws the same prompts and initial noise (noise seed `seed + i` for
prompt i), so MixDQ can compare a partially quantized model's images with the FP images.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def pipeline_calibrator(pipe, prompts: Sequence[str], *, steps: int, guidance: float, height: int, width: int,
                        seed: int = 0, batch_size: int = 8, **call_kwargs) -> Callable[[int], torch.Tensor]:
    def calibrate(n: int) -> torch.Tensor:
        if n > len(prompts):
            raise ValueError(f"asked for {n} calibration prompts, only {len(prompts)} available")
        images = []
        for start in range(0, n, batch_size):
            batch = list(prompts[start:min(n, start + batch_size)])
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]
            out = pipe(prompt=batch, num_inference_steps=steps, guidance_scale=guidance, height=height,
                       width=width, generator=gens, output_type="pt", **call_kwargs)
            images.append(out.images.float().cpu())
        return torch.cat(images)

    return calibrate


# ---------------------------------------------------------------------------- replayed denoiser calls
Call = tuple[tuple, dict]


def record_denoiser_calls(denoiser: torch.nn.Module, run: Callable[[], object]) -> list[Call]:
    """The (args, kwargs) of every denoiser call made by `run()` (e.g. one pipeline call)."""
    calls: list[Call] = []

    def hook(_module, args, kwargs):
        calls.append((_detached(args), _detached(kwargs)))

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls


def replay_calibrator(denoiser: torch.nn.Module, calls: Sequence[Call]) -> Callable[[int], torch.Tensor]:
    """A cheap `calibrate(n)` that replays the first n recorded denoiser calls (tests, speed benchmarks).

    Its "images" are the outputs squashed to (B, 3, s, s) in [0, 1]: enough for MixDQ's
    image comparisons when only the mechanics matter, not a substitute for real images.
    """
    def calibrate(n: int) -> torch.Tensor:
        if n > len(calls):
            raise ValueError(f"asked for {n} calibration calls, only {len(calls)} recorded")
        outs = []
        with torch.no_grad():
            for args, kwargs in calls[:n]:
                out = denoiser(*args, **kwargs)
                outs.append(_as_images(out[0] if isinstance(out, tuple) else getattr(out, "sample", out)))
        return torch.cat(outs)

    calibrate.calls = calls
    return calibrate


def _as_images(y: torch.Tensor) -> torch.Tensor:
    y = y.detach().float().flatten(1)
    s = int((y.shape[1] // 3) ** 0.5)
    return torch.sigmoid(y[:, : 3 * s * s].reshape(-1, 3, s, s)).cpu()


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detached(v) for k, v in obj.items()}
    return obj
