"""MixDQ's bit allocation: an integer program over per-layer bit widths (scipy `milp`).

Choose one option b_l per layer to minimise the summed sensitivity e[l, b_l] subject to the
size-weighted average bit width staying within the budget:  sum_l n_l b_l <= B sum_l n_l.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp


def allocate_bits(errors: np.ndarray, sizes: np.ndarray, options: tuple[int, ...], budget: float) -> np.ndarray:
    """errors: (L, K) sensitivity of layer l at options[k]; sizes: (L,) elements; returns bits per layer."""
    errors = np.asarray(errors, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    n_layers, n_opts = errors.shape
    if n_opts != len(options) or sizes.shape != (n_layers,):
        raise ValueError("errors must be (layers, options) and sizes (layers,)")
    if budget < min(options):
        raise ValueError(f"bit budget {budget} is below the smallest option {min(options)}")
    if n_layers == 0:
        return np.zeros(0, dtype=int)
    # Integer sizes, bits and budget make the budget row integral: an integral x within the solver's
    # feasibility tolerance (< 1) then satisfies it exactly, so no safety margin is needed.
    sizes = np.maximum(np.round(sizes), 1)
    one_per_layer = np.kron(np.eye(n_layers), np.ones(n_opts))              # sum_k x[l, k] = 1
    bits = (sizes[:, None] * np.asarray(options, dtype=np.float64)[None, :]).ravel()
    within_budget = LinearConstraint(bits[None, :], -np.inf, np.floor(budget * sizes.sum()))
    res = milp(
        c=errors.ravel(), constraints=[LinearConstraint(one_per_layer, 1, 1), within_budget],
        integrality=np.ones(n_layers * n_opts), bounds=Bounds(0, 1),
    )
    if not res.success:
        raise RuntimeError(f"MixDQ bit allocation failed: {res.message}")
    chosen = np.asarray(options)[np.round(res.x).reshape(n_layers, n_opts).argmax(1)]
    if (sizes * chosen).sum() > budget * sizes.sum():
        raise RuntimeError("MixDQ bit allocation exceeded its budget")
    return chosen
