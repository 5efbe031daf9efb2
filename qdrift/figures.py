"""The report's figures, each a function returning PNG bytes (matplotlib, no display needed).

- `image_grid`: FP / quantized / each corrector / reference for the same prompts (paper Fig. 1);
- `fid_vs_k_figure`: FID of every variant against the calibration size K (Fig. 2, right);
- `residual_variance_figure`: the residual variance V_i of the guided error per step (Fig. 3);
- `gap_recovered_figure`: the share of the FP-quantized FID gap each corrector closes, with CIs;
- `drift_factor_figure`: each corrector's per-step drift factor c_i (the relative change of the update);
- `calibration_size_figure`: V_i per step fitted from K runs of a larger pool, median and min-max
  envelope over nested resamples (Fig. 2, left; V_i is what each step's correction is computed from);
- `gaussianity_figure`, `correlation_figure`: the output and error at a latent coordinate against
  fitted normals (Fig. 4), and the error's correlations between coordinates against a shuffled
  baseline (Fig. 5), from raw paired samples (a run's stats/samples.safetensors, kept by calibration,
  or experiments/error_figures.py for more runs); `error_sample_figures` draws both from the former.
"""
from __future__ import annotations

import io
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

THUMB = 128   # pixels per grid cell


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def image_grid(run_dir: Path, num_prompts: int, count: int = 6, joined: tuple = ()) -> bytes | None:
    """Rows = variants (fp, quant, correctors) and the reference; columns = the first `count` prompts.
    `joined`: run directories of the same replicate whose other correctors' images join the grid."""
    images = Path(run_dir) / "images"
    if not images.is_dir():
        return None
    order = ["fp", "quant"]
    found = {}
    for d in (images, *(Path(j) / "images" for j in joined if (Path(j) / "images").is_dir())):
        for v in d.iterdir():
            if v.is_dir():
                found.setdefault(v.name, v)
    names = order + sorted(n for n in found if n not in order)
    rows = [(n, found[n]) for n in names if n in found]
    if (Path(run_dir) / "references").is_dir():
        rows.append(("reference", Path(run_dir) / "references"))
    cols = [i for i in range(min(count, num_prompts)) if all((d / f"{i}.png").is_file() for _, d in rows)]
    if not rows or not cols:
        return None
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols) + 0.8, 1.3 * len(rows)), squeeze=False)
    for r, (name, d) in enumerate(rows):
        for c, i in enumerate(cols):
            ax = axes[r][c]
            img = Image.open(d / f"{i}.png").convert("RGB")
            img.thumbnail((THUMB, THUMB))
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0:
                ax.set_title(f"#{i}", fontsize=8)
    return _png(fig)


def clipped_bar(val: float, lo: float, hi: float, limit: float | None) -> tuple[float, float, float, str]:
    """(value, low, high, label) of a bar drawn within +-limit: a value beyond it is cut at the edge,
    without a whisker, and labelled with itself; whiskers stop at the edge; NaN bounds stay NaN."""
    if limit is None:
        return val, lo, hi, ""
    if abs(val) > limit:
        edge = math.copysign(limit, val)
        return edge, edge, edge, f"{val:+.0f}"
    lo, hi = (max(-limit, min(limit, v)) if math.isfinite(v) else v for v in (lo, hi))
    return val, lo, hi, ""


def gap_recovered_figure(labels: list[str], gaps: list[dict[str, tuple | None]], limit: float | None = None) -> bytes:
    """Per setting (x) and corrector (bars): gap recovered in %, with the CI as error bars. `limit` (%)
    bounds the y axis: a bar beyond it is cut at the edge and labelled with its value, without a
    whisker, and whiskers stop at the edge."""
    correctors = list(dict.fromkeys(c for g in gaps for c in g))
    fig, ax = plt.subplots(figsize=(min(14.0, max(4.0, 1.2 * len(labels) * max(1, len(correctors)) / 2)), 3.6))
    width = 0.8 / max(1, len(correctors))
    for j, c in enumerate(correctors):
        xs, ys, err = [], [], [[], []]
        for i, g in enumerate(gaps):
            if g.get(c) is None:
                continue
            x = i + (j - (len(correctors) - 1) / 2) * width
            val, lo, hi, label = clipped_bar(*(100 * v for v in g[c]), limit)
            if label:
                ax.annotate(label, (x, math.copysign(0.97 * limit, val)), fontsize=6, ha="center",
                            va="top" if val > 0 else "bottom", rotation=90,
                            bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
            xs.append(x)
            ys.append(val)
            err[0].append(max(0.0, val - lo) if math.isfinite(lo) else 0.0)
            err[1].append(max(0.0, hi - val) if math.isfinite(hi) else 0.0)
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=c)
    if limit is not None:
        ax.set_ylim(-limit, limit)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("gap recovered (%)")
    ax.set_xlabel("setting")
    if correctors:
        ax.legend(fontsize=7)
    return _png(fig)


def fid_vs_k_groups(runs, keys: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Runs that differ only in K, grouped: {setting: {variant: [(K, FID), ...]}} (groups of 2+ K)."""
    from qdrift.report import setting_value

    groups: dict[str, list] = defaultdict(list)
    for r in runs:
        rest = json.dumps({k: setting_value(r, k) for k in keys if k != "calib.num_runs"}, sort_keys=True,
                          default=str)
        groups[rest].append(r)
    out = {}
    for rest, members in groups.items():
        if len({r.flat.get("calib.num_runs") for r in members}) < 2:
            continue
        series: dict[str, list] = defaultdict(list)
        for r in sorted(members, key=lambda r: int(r.flat.get("calib.num_runs"))):
            for v, m in r.variants.items():
                if "fid" in m:
                    series[v].append((int(r.flat["calib.num_runs"]), m["fid"]))
        label = " ".join(f"{k.split('.')[-1]}={v}" for k, v in json.loads(rest).items())
        if series:   # runs without references have no FID
            out[label] = dict(series)
    return out


def fid_vs_k_figure(groups: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes:
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, (label, series) in zip(axes[0], groups.items()):
        for v, points in series.items():
            ks, fids = zip(*points)
            ax.plot(ks, fids, marker="o", label=v, ls="--" if v in ("fp", "quant") else "-")
        ax.set_xscale("log")
        ax.set_xlabel("calibration size K")
        ax.set_ylabel("FID")
        ax.set_title(label, fontsize=7)
        ax.legend(fontsize=7)
    return _png(fig)


def residual_variance_figure(stats: list[tuple[str, dict]]) -> bytes:
    """V_i (scalar pooling) per sampling step, one line per run: the late-step growth of Fig. 3."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, s in stats:
        v = [row[0] if isinstance(row, list) else row for row in s["residual_var_scalar"]]
        ax.plot(range(len(v)), v, marker=".", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step i")
    ax.set_ylabel("residual variance V_i")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _png(fig)


def drift_factor_figure(stats: list[tuple[str, dict]]) -> bytes:
    """c_i per sampling step (mean over channels for channel pooling), one line per run and corrector,
    from the `drift_factors` of each run's stats/summary.json."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    positive = True
    for label, s in stats:
        for variant, rows in s.get("drift_factors", {}).items():
            c = [sum(row) / len(row) if isinstance(row, list) else row for row in rows]
            positive = positive and all(v > 0 for v in c)
            ax.plot(range(len(c)), c, marker=".", label=f"{label} {variant}".strip())
    ax.set_yscale("log" if positive else "linear")
    ax.set_xlabel("sampling step i")
    ax.set_ylabel("drift factor c_i")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _png(fig)


def calibration_size_figure(pool, ks=(1, 5, 10, 50), resamples: int = 200, seed: int = 0) -> bytes | None:
    """For each K the pool can serve: fit V_i on K runs drawn without replacement, `resamples` times
    (nested: K = 1 is the first run of the same permutation that gives K = 5, ...), and draw the median
    and the min-max envelope per step. None when the pool has a single run."""
    import torch

    ks = [k for k in ks if k < pool.num_runs] + [pool.num_runs]
    ks = sorted(set(ks))
    if pool.num_runs < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    fits = {k: [] for k in ks}
    for _ in range(resamples):
        order = torch.randperm(pool.num_runs, generator=gen)
        for k in ks:
            fits[k].append(pool.fit(order[:k].tolist(), "scalar").residual_var.flatten())
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = range(pool.num_steps)
    for k in ks:
        v = torch.stack(fits[k]).double()
        line, = ax.plot(steps, v.median(0).values, label=f"K = {k}")
        ax.fill_between(steps, v.min(0).values, v.max(0).values, color=line.get_color(), alpha=0.2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling step i")
    ax.set_ylabel("V_i fitted from K runs")
    ax.set_title(f"median and min-max over {resamples} nested resamples of {pool.num_runs} runs", fontsize=7)
    ax.legend(fontsize=7)
    return _png(fig)


def gaussianity_figure(samples: dict[str, dict[str, "object"]]) -> bytes:
    """Histograms with fitted normals (Fig. 4): `samples` maps a panel title (e.g. "step 5") to
    {"output u": values, "error e": values}, each a 1-D array over runs at one latent coordinate."""
    import numpy as np
    from scipy import stats

    cols = len(samples)
    fig, axes = plt.subplots(2, cols, figsize=(3.0 * cols, 4.6), squeeze=False)
    for c, (title, series) in enumerate(samples.items()):
        for r, (name, values) in enumerate(series.items()):
            x = np.asarray(values, dtype=float)
            ax = axes[r][c]
            ax.hist(x, bins=max(8, int(np.sqrt(x.size))), density=True, alpha=0.6)
            mu, sd = x.mean(), x.std(ddof=1)
            if sd > 0:
                grid = np.linspace(x.min(), x.max(), 200)
                ax.plot(grid, stats.norm.pdf(grid, mu, sd), color="black", lw=1)
                p = stats.shapiro(x).pvalue if 3 <= x.size <= 5000 else float("nan")
                ax.set_title(f"{title}: {name}\nShapiro-Wilk p = {p:.2f}", fontsize=7)
            else:
                ax.set_title(f"{title}: {name}\nconstant ({mu:.3g})", fontsize=7)
            ax.set_xlabel(name)
            ax.set_ylabel("density")
    fig.tight_layout()
    return _png(fig)


def correlation_figure(errors: dict[str, "object"], seed: int = 0) -> bytes:
    """Off-diagonal correlations of the error between latent coordinates (Fig. 5), against the same
    errors with each coordinate shuffled independently over runs (what chance alone gives).
    `errors` maps a panel title to an (N runs, D coordinates) array."""
    import numpy as np

    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, len(errors), figsize=(3.2 * len(errors), 3.0), squeeze=False)
    for ax, (title, e) in zip(axes[0], errors.items()):
        e = np.asarray(e, dtype=float)
        e = e[:, e.std(axis=0) > 0]   # a constant coordinate has no correlation
        if e.shape[1] < 2:
            ax.set_title(f"{title}: fewer than 2 varying coordinates", fontsize=7)
            continue
        off = ~np.eye(e.shape[1], dtype=bool)
        real = np.corrcoef(e, rowvar=False)[off]
        shuffled = np.corrcoef(np.stack([rng.permutation(col) for col in e.T], axis=1), rowvar=False)[off]
        bins = np.linspace(-1, 1, 41)
        ax.hist(shuffled, bins=bins, density=True, alpha=0.5, label="shuffled")
        ax.hist(real, bins=bins, density=True, alpha=0.5, label="error")
        ax.set_title(f"{title}: mean |r| {np.abs(real).mean():.3f} vs {np.abs(shuffled).mean():.3f}", fontsize=7)
        ax.set_xlabel("off-diagonal correlation r")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    return _png(fig)


def error_sample_figures(samples, min_runs: int = 3) -> tuple[bytes, bytes] | str:
    """Fig. 4 and Fig. 5 of one run's raw calibration samples (drift/samples.py `ErrorSamples`):
    u and e over the N runs at the first kept coordinate, per kept step, and the correlations of e
    over the kept field. Returns why not instead when they cannot say anything."""
    import numpy as np

    n = samples.num_runs
    if n < min_runs:
        return f"{n} calibration run(s): too few to draw a distribution (at least {min_runs})"
    e = samples.e.numpy()
    if not np.any(e):
        return "the error is zero at every kept coordinate (the quantized model equals the FP one there)"
    where = samples.point_label(0)
    hist = {f"step {s} ({where})": {"output u": samples.u[:, j, 0].numpy(), "error e": e[:, j, 0]}
            for j, s in enumerate(samples.steps)}
    corr = {f"step {s}, {samples.field.shape[2]} coordinates": samples.field[:, j].numpy()
            for j, s in enumerate(samples.steps)}
    return gaussianity_figure(hist), correlation_figure(corr)
