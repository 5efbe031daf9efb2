"""Calibration observers: running input statistics per layer, never raw activation dumps.

An `InputObserver` is a forward pre-hook that keeps, for one layer's input, the per-channel
min/max (SVDQuant's max|X_j| and MixDQ's per-tensor range derive from them), the number of
tokens seen, and optionally a bounded uniform random subsample of tokens (reservoir sampling
with seeded random priorities: memory stays O(max_tokens x channels) however long the
calibration runs, and the same inputs give the same sample).

Everything stays on the input's device, priorities included (a generator per device): a hook
that copies to or from the host forces a sync on every call, which made observing a real-size
model on a GPU cost 100x its forward passes.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class InputObserver:
    def __init__(self, max_tokens: int = 0, skip_first_token: bool = False, seed: int = 0,
                 name: str = "") -> None:
        self.max_tokens = max_tokens
        self.skip_first_token = skip_first_token   # BOS-aware: the first text token is not quantized
        self.ch_min: torch.Tensor | None = None
        self.ch_max: torch.Tensor | None = None
        self.tokens = 0
        self.calls = 0
        self._keys: torch.Tensor | None = None      # priorities of the kept tokens
        self.sample: torch.Tensor | None = None     # (<= max_tokens, C), the input dtype
        self._seed = seed * 1_000_003 + zlib.crc32(name.encode())
        self._gen: torch.Generator | None = None

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if x.dim() == 4 and isinstance(module, nn.Conv2d):
            x = x.movedim(1, -1)                      # channels last: a token per pixel
        elif self.skip_first_token and x.dim() == 3:
            x = x[:, 1:]
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        xf = x.to(torch.float32)
        mn, mx = xf.amin(0), xf.amax(0)
        self.ch_min = mn if self.ch_min is None else torch.minimum(self.ch_min, mn)
        self.ch_max = mx if self.ch_max is None else torch.maximum(self.ch_max, mx)
        self.tokens += x.shape[0]
        self.calls += 1
        if self.max_tokens:
            self._reservoir(x)

    def _reservoir(self, x: torch.Tensor) -> None:
        if self._gen is None:
            self._gen = torch.Generator(device=x.device).manual_seed(self._seed)
        keys = torch.rand(x.shape[0], generator=self._gen, device=x.device)
        top, idx = keys.topk(min(self.max_tokens, x.shape[0]))
        new = x[idx]
        if self.sample is None:
            self._keys, self.sample = top, new
            return
        keys = torch.cat([self._keys, top])
        data = torch.cat([self.sample, new])
        self._keys, idx = keys.topk(min(self.max_tokens, keys.numel()))
        self.sample = data[idx]


    @property
    def absmax(self) -> torch.Tensor:
        """max |X_j| per input channel."""
        return torch.maximum(self.ch_max.abs(), self.ch_min.abs())

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor (min, max)."""
        return self.ch_min.min(), self.ch_max.max()


@contextmanager
def observing(model: nn.Module, observers: dict[str, InputObserver]) -> Iterator[dict[str, InputObserver]]:
    """Attach observers (by module name) for the duration of the block."""
    handles = [model.get_submodule(n).register_forward_pre_hook(o) for n, o in observers.items()]
    try:
        yield observers
    finally:
        for h in handles:
            h.remove()
