"""Batched, anti-aliased torch renderer of bench scenes: 64x64 RGB in [0, 1], on any device.

Shapes are signed distance functions evaluated on the pixel grid for a whole batch at once
(coverage = clamp(0.5 - distance, 0, 1) is a one-pixel anti-aliasing ramp). Per-image jitter
(position, size, rotation, colour, background phase) comes from a counter-based hash of
(seed, image index), so an image does not depend on batch size, chunking or device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .grammar import BACKGROUNDS, COLOURS, MAX_OBJECTS, SHAPES, SIZES, Scene

RESOLUTION = 64
RGB = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.70, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.10), "purple": (0.60, 0.20, 0.80), "orange": (1.00, 0.55, 0.05),
    "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05),
}
# Backgrounds: (colour A, colour B); plain ones have A == B. Chosen away from the object colours.
BACKGROUND_RGB = {
    "gray": ((0.50, 0.50, 0.50),) * 2, "pink": ((0.98, 0.70, 0.78),) * 2, "cyan": ((0.50, 0.85, 0.90),) * 2,
    "brown": ((0.45, 0.28, 0.15),) * 2, "navy": ((0.10, 0.12, 0.40),) * 2, "olive": ((0.45, 0.45, 0.15),) * 2,
    "striped": ((0.80, 0.80, 0.80), (0.32, 0.32, 0.32)), "checkered": ((0.82, 0.82, 0.82), (0.30, 0.30, 0.30)),
}
RADIUS = {"small": 4.5, "medium": 6.75, "large": 9.0}   # pixels; cells are 21.3 px wide
JITTER = {"position": 1.0, "scale": 0.06, "rotation": math.radians(8), "colour": 0.03, "brightness": 0.03}
_DRAWS_PER_SLOT = 5
_NUM_DRAWS = MAX_OBJECTS * _DRAWS_PER_SLOT + 3
assert set(RGB) == set(COLOURS) and set(BACKGROUND_RGB) == set(BACKGROUNDS) and set(RADIUS) == set(SIZES)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def uniforms(seed: int, index: np.ndarray, n: int) -> np.ndarray:
    """[len(index), n] uniforms in [0, 1), a pure function of (seed, index, draw)."""
    key = _splitmix64(np.array([seed], dtype=np.uint64))
    with np.errstate(over="ignore"):
        ctr = index.astype(np.uint64)[:, None] * np.uint64(1024) + np.arange(n, dtype=np.uint64)[None]
        bits = _splitmix64(_splitmix64(ctr ^ key))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def _pack(scenes: Sequence[Scene]) -> dict[str, np.ndarray]:
    n = len(scenes)
    shape = np.full((n, MAX_OBJECTS), -1, dtype=np.int64)
    colour = np.zeros((n, MAX_OBJECTS, 3))
    radius = np.zeros((n, MAX_OBJECTS))
    cell = np.zeros((n, MAX_OBJECTS), dtype=np.int64)
    bg = np.zeros(n, dtype=np.int64)
    shape_id = {s: i for i, s in enumerate(SHAPES)}
    bg_id = {b: i for i, b in enumerate(BACKGROUNDS)}
    for i, sc in enumerate(scenes):
        bg[i] = bg_id[sc.background]
        for j, o in enumerate(sc.objects):
            shape[i, j], colour[i, j] = shape_id[o.shape], RGB[o.colour]
            radius[i, j], cell[i, j] = RADIUS[o.size], o.cell
    return dict(shape=shape, colour=colour, radius=radius, cell=cell, bg=bg)


# ---- signed distances in object-local pixel coordinates (x right, y up); negative inside ----

def _box(x, y, hx, hy):
    qx, qy = x.abs() - hx, y.abs() - hy
    return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def _triangle(x, y, r):
    # Equilateral, tip up, circumradius r, centred on its bounding box: intersection of three half-planes.
    y = y + r / 4
    d = -y - r / 2
    for ang in (math.radians(30), math.radians(150)):
        d = torch.maximum(d, x * math.cos(ang) + y * math.sin(ang) - r / 2)
    return d


def _star(x, y, r, points: int = 5, inner: float = 0.45):
    # Fold the plane into one half-sector [0, pi/points]; there the edge is the segment tip A -> notch B.
    a = math.pi / points
    phi = (torch.remainder(torch.atan2(x, y) + a, 2 * a) - a).abs()
    rho = torch.hypot(x, y)
    qx, qy = rho * torch.cos(phi) - r, rho * torch.sin(phi)                 # q - A, with A = (r, 0)
    abx, aby = r * (inner * math.cos(a) - 1), r * inner * math.sin(a)      # B - A
    h = ((qx * abx + qy * aby) / (abx ** 2 + aby ** 2)).clamp(0, 1)
    dist = torch.hypot(qx - h * abx, qy - h * aby)
    inside = (abx * qy - aby * qx) > 0
    return torch.where(inside, -dist, dist)


def _shape_sdf(kind: int, x, y, r):
    name = SHAPES[kind]
    if name == "circle":
        return torch.hypot(x, y) - r
    if name == "square":
        return _box(x, y, 0.8 * r, 0.8 * r)
    if name == "triangle":
        return _triangle(x, y, r)
    if name == "star":
        return _star(x, y, r)
    if name == "cross":
        return torch.minimum(_box(x, y, 0.95 * r, 0.3 * r), _box(x, y, 0.3 * r, 0.95 * r))
    if name == "ring":
        return (torch.hypot(x, y) - 0.68 * r).abs() - 0.24 * r
    if name == "diamond":
        hx, hy = 0.7 * r, r
        return (x.abs() / hx + y.abs() / hy - 1) * (hx * hy / torch.hypot(hx, hy))
    raise AssertionError(name)


def _render_chunk(p: dict[str, torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    n, dev = p["bg"].shape[0], p["bg"].device
    res, cell_px = RESOLUTION, RESOLUTION / 3
    coords = torch.arange(res, device=dev, dtype=torch.float32) + 0.5
    py, px = coords.view(1, 1, res, 1), coords.view(1, 1, 1, res)

    # Background: two colours mixed by a texture mask (plain backgrounds have equal colours).
    bg_a = torch.tensor([c[0] for c in BACKGROUND_RGB.values()], device=dev)[p["bg"]]
    bg_b = torch.tensor([c[1] for c in BACKGROUND_RGB.values()], device=dev)[p["bg"]]
    ph1, ph2, bright = (u[:, -3 + k].view(n, 1, 1, 1) for k in range(3))
    stripes = torch.sin(2 * math.pi * ((px + py) / math.sqrt(2) / 8 + ph1))
    checks = torch.sin(math.pi * (px / 8 + 2 * ph1)) * torch.sin(math.pi * (py / 8 + 2 * ph2))
    is_checker = (p["bg"] == BACKGROUNDS.index("checkered")).view(n, 1, 1, 1)
    mask = torch.where(is_checker, 0.5 + 2.0 * checks, 0.5 + 1.3 * stripes).clamp(0, 1)
    img = bg_b.view(n, 3, 1, 1) + (bg_a - bg_b).view(n, 3, 1, 1) * mask
    img = img * (1 + 2 * JITTER["brightness"] * (bright - 0.5))

    # Objects, composited in slot order (cells are distinct, so order hardly matters).
    for s in range(MAX_OBJECTS):
        d = u[:, s * _DRAWS_PER_SLOT: (s + 1) * _DRAWS_PER_SLOT]
        kind = p["shape"][:, s]
        row, col = torch.div(p["cell"][:, s], 3, rounding_mode="floor"), p["cell"][:, s] % 3
        cx = (col + 0.5) * cell_px + JITTER["position"] * (2 * d[:, 0] - 1)
        cy = (row + 0.5) * cell_px + JITTER["position"] * (2 * d[:, 1] - 1)
        r = (p["radius"][:, s] * (1 + JITTER["scale"] * (2 * d[:, 2] - 1))).view(n, 1, 1, 1)
        rot = JITTER["rotation"] * (2 * d[:, 3] - 1)
        dx, dy = px - cx.view(n, 1, 1, 1), py - cy.view(n, 1, 1, 1)
        c, sn = torch.cos(rot).view(n, 1, 1, 1), torch.sin(rot).view(n, 1, 1, 1)
        lx, ly = c * dx + sn * dy, -(-sn * dx + c * dy)                     # local frame, y up
        sdf = torch.full((n, 1, res, res), 1e3, device=dev)
        for k in range(len(SHAPES)):
            sel = kind == k
            if bool(sel.any()):
                sdf[sel] = _shape_sdf(k, lx[sel], ly[sel], r[sel])
        cover = (0.5 - sdf).clamp(0, 1) * (kind >= 0).view(n, 1, 1, 1)
        colour = (p["colour"][:, s] + JITTER["colour"] * (2 * d[:, 4:5] - 1)).clamp(0, 1)
        img = img * (1 - cover) + colour.view(n, 3, 1, 1) * cover
    return img.clamp(0, 1)


@torch.no_grad()
def render(scenes: Sequence[Scene], seed: int = 0, device: str | torch.device = "cpu",
           start_index: int = 0, chunk: int = 2048) -> torch.Tensor:
    """Render `scenes` -> float32 [N, 3, 64, 64] in [0, 1] on `device`; image i uses jitter (seed, start_index + i)."""
    n = len(scenes)
    out = torch.empty(n, 3, RESOLUTION, RESOLUTION, device=device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        packed = {k: torch.as_tensor(v, device=device) for k, v in _pack(scenes[a:b]).items()}
        packed["colour"], packed["radius"] = packed["colour"].float(), packed["radius"].float()
        u = torch.as_tensor(uniforms(seed, np.arange(start_index + a, start_index + b), _NUM_DRAWS),
                            dtype=torch.float32, device=device)
        out[a:b] = _render_chunk(packed, u)
    return out
