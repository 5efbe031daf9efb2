"""Replay a denoiser's forward as a captured CUDA graph (one graph per input signature).

A fake-quant step launches several kernels per linear layer (activation quantizer, low-rank
branch, GEMM); at the sizes of the paper's models the GPU then waits on Python to launch them.
A CUDA graph records the launches once and replays them with a single call, so the step costs
what its kernels cost. Graphs need static shapes and addresses: inputs are copied into buffers
owned by the graph, and a new graph is captured for each new signature (shapes, dtypes, the
non-tensor arguments and `state_key()`, e.g. whether quantization is switched on).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

log = logging.getLogger(__name__)


def signature(args: tuple, kwargs: dict) -> tuple | None:
    """What a captured graph is specialised to; None when an argument cannot be part of a key."""
    leaves, spec = tree_flatten((args, kwargs))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append(leaf)
    return str(spec), tuple(key)


class _Graph:
    def __init__(self, forward: Callable, args: tuple, kwargs: dict, pool, warmup: int) -> None:
        leaves, self.spec = tree_flatten((args, kwargs))
        self.static = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args, static_kwargs = tree_unflatten(self.static, self.spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):   # warm-up off the capture (Triton JIT, cuBLAS workspaces)
            for _ in range(warmup):
                forward(*static_args, **static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = forward(*static_args, **static_kwargs)

    def __call__(self, args: tuple, kwargs: dict):
        leaves, _ = tree_flatten((args, kwargs))
        for dst, src in zip(self.static, leaves):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        self.graph.replay()
        # The next replay overwrites the graph's outputs; schedulers keep earlier model outputs.
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, self.out)


class CudaGraphForward:
    """Callable installed as `module.forward`; eager when grads are on or an argument is unhashable."""

    def __init__(self, module: nn.Module, state_key: Callable[[], Hashable] = lambda: None,
                 max_graphs: int = 16, warmup: int = 2) -> None:
        self.eager = module.forward
        self.state_key = state_key
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.graphs: dict = {}
        self.pool = torch.cuda.graph_pool_handle()   # graphs share one memory pool
        self.captures = self.replays = 0

    def __call__(self, *args, **kwargs):
        sig = signature(args, kwargs)
        if sig is None or torch.is_grad_enabled():
            return self.eager(*args, **kwargs)
        # Tensors made under inference mode cannot be written outside it: that is part of the key too.
        key = (sig, torch.is_inference_mode_enabled(), self.state_key())
        if key not in self.graphs:
            self.graphs[key] = self._capture(args, kwargs)
        graph = self.graphs[key]
        if graph is None:
            return self.eager(*args, **kwargs)
        self.replays += 1
        return graph(args, kwargs)

    def _capture(self, args: tuple, kwargs: dict) -> _Graph | None:
        """A graph for this signature, or None (run eagerly) past `max_graphs` or when capture fails."""
        if len(self.graphs) >= self.max_graphs:
            log.warning("cuda_graph: more than %d input signatures; new ones run eagerly", self.max_graphs)
            return None
        try:
            graph = _Graph(self.eager, args, kwargs, self.pool, self.warmup)
        except RuntimeError as err:   # e.g. a host sync or a CPU tensor inside the forward
            log.warning("cuda_graph: capture failed (%s); this signature runs eagerly", str(err).splitlines()[0])
            torch.cuda.synchronize()
            return None
        self.captures += 1
        return graph


def use_cuda_graphs(module: nn.Module, state_key: Callable[[], Hashable] = lambda: None, **kw) -> CudaGraphForward:
    """Route `module(...)` through captured graphs (undo with `eager_forward`)."""
    if not torch.cuda.is_available() or next(module.parameters()).device.type != "cuda":
        raise ValueError("cuda_graph needs the model on a CUDA device (device=cuda)")
    eager_forward(module)
    module.forward = CudaGraphForward(module, state_key, **kw)
    return module.forward


def eager_forward(module: nn.Module) -> nn.Module:
    """Remove the graph routing (and the graphs' memory) from `module`, if installed."""
    if isinstance(module.__dict__.get("forward"), CudaGraphForward):
        del module.forward
    return module
