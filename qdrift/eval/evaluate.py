"""The evaluate stage: every metric of every variant's image directory, as plain floats."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from qdrift.eval.bootstrap import bootstrap_mean_ci, paired_bootstrap_fid_delta
from qdrift.eval.clip_score import ClipScorer
from qdrift.eval.features import FeatureExtractor, feature_cache
from qdrift.eval.fid import frechet_distance, kid
from qdrift.eval.images import image_indices, load_images
from qdrift.eval.paired import load_lpips, paired_metrics


def _check_inputs(
    dirs: Mapping[str, Path],
    prompts: Sequence[str],
    reference_dir: Path | None,
    fp: str,
    baseline: str | None,
    num_resamples: int,
) -> None:
    """Fail fast, before any feature extraction, on inputs that would give wrong or partial metrics."""
    if fp not in dirs:
        raise ValueError(f"the FP variant {fp!r} is not among the variants {sorted(dirs)}")
    if baseline is not None and baseline not in dirs:
        raise ValueError(
            f"baseline {baseline!r} is not among the variants {sorted(dirs)}; pass baseline=None to skip FID deltas"
        )
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be >= 1, got {num_resamples}")
    expected = list(range(len(prompts)))
    if not expected:
        raise ValueError("no prompts given")
    for name, d in dirs.items():
        got = image_indices(d)
        if got != expected:
            missing = sorted(set(expected) - set(got))[:5]
            extra = sorted(set(got) - set(expected))[:5]
            raise ValueError(
                f"variant {name!r} ({d}) has {len(got)} images but there are {len(prompts)} prompts; "
                f"every variant needs exactly 0.png..{len(prompts) - 1}.png "
                f"(missing e.g. {missing}, unexpected e.g. {extra})"
            )
    if reference_dir is not None:
        image_indices(reference_dir)  # raises on a missing or empty reference directory


def _per_image(
    directory: Path,
    fp_dir: Path | None,
    prompts: Sequence[str],
    clip_scorer: ClipScorer | None,
    lpips_net: nn.Module | None,
    batch_size: int,
    device: torch.device,
) -> dict[str, Tensor]:
    """CLIP scores and paired-vs-FP metrics per image, streaming the images in batches (metrics on `device`)."""
    parts: dict[str, list[Tensor]] = {}
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        images = load_images(directory, idx).to(device)
        if clip_scorer is not None:
            parts.setdefault("clip_score", []).append(clip_scorer(images, [prompts[i] for i in idx]))
        if fp_dir is not None:
            for key, values in paired_metrics(images, load_images(fp_dir, idx).to(device), lpips_net).items():
                parts.setdefault(key, []).append(values.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def evaluate_variants(
    variant_dirs: Mapping[str, str | os.PathLike],
    prompts: Sequence[str],
    reference_dir: str | os.PathLike | None,
    features: FeatureExtractor,
    clip_scorer: ClipScorer | None,
    *,
    fp: str = "fp",
    baseline: str | None = "quant",
    num_resamples: int = 1000,
    seed: int = 0,
    kid_subset_size: int = 100,
    kid_num_subsets: int = 100,
    lpips_weights: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """Metrics per variant (``{"fp": {...}, "quant": {...}, "qdrift": {...}}``), JSON-serialisable floats.

    Keys: ``fid``, ``kid_mean``, ``kid_std`` (vs `reference_dir`; absent when it is None);
    ``fid_vs_fp``, ``psnr_vs_fp``, ``ssim_vs_fp`` [, ``lpips_vs_fp``] (not for `fp` itself: trivially
    perfect there); ``clip_score``, ``clip_score_ci_low/high`` (when `clip_scorer` is given); and for
    each variant other than `fp` and `baseline`, with a reference: ``fid_delta_vs_<baseline>``,
    ``fid_delta_ci_low/high``, ``fid_delta_p_below_zero`` (paired bootstrap of
    FID(variant, ref) - FID(baseline, ref); negative = the variant is closer to the reference).
    Features are cached next to the images (see `feature_cache`), so re-running is cheap.
    """
    dirs = {name: Path(d) for name, d in variant_dirs.items()}
    ref_dir = Path(reference_dir) if reference_dir is not None else None
    _check_inputs(dirs, prompts, ref_dir, fp, baseline, num_resamples)

    feats = {name: feature_cache(d, features) for name, d in dirs.items()}
    ref = feature_cache(ref_dir, features) if ref_dir is not None else None
    lpips_net = load_lpips(lpips_weights, device)

    metrics: dict[str, dict[str, float]] = {name: {} for name in dirs}
    for name, d in dirs.items():
        m = metrics[name]
        if ref is not None:
            m["fid"] = frechet_distance(feats[name], ref)
            m["kid_mean"], m["kid_std"] = kid(feats[name], ref, kid_subset_size, kid_num_subsets, seed)
        if name != fp:
            m["fid_vs_fp"] = frechet_distance(feats[name], feats[fp])
        per_image = _per_image(d, dirs[fp] if name != fp else None, prompts, clip_scorer, lpips_net, batch_size,
                               torch.device(device))
        if "clip_score" in per_image:
            ci = bootstrap_mean_ci(per_image["clip_score"], num_resamples, seed)
            m["clip_score"], m["clip_score_ci_low"], m["clip_score_ci_high"] = ci["mean"], ci["ci_low"], ci["ci_high"]
        for key in ("psnr", "ssim", "lpips"):
            if key in per_image:
                m[f"{key}_vs_fp"] = float(per_image[key].mean())

    if ref is not None and baseline is not None:
        for name in dirs:
            if name in (fp, baseline):
                continue
            boot = paired_bootstrap_fid_delta(
                feats[baseline], feats[name], ref, num_resamples, seed, device=device, progress=True
            )
            metrics[name][f"fid_delta_vs_{baseline}"] = boot["delta"]
            metrics[name]["fid_delta_ci_low"] = boot["ci_low"]
            metrics[name]["fid_delta_ci_high"] = boot["ci_high"]
            metrics[name]["fid_delta_p_below_zero"] = boot["p_below_zero"]
    return metrics


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else format(value, spec)


def format_header(config: Mapping, num_prompts: int) -> str:
    """The line above the table: what was measured (model, sampler, quantizer, K, prompts)."""
    s = config["sampler"]
    k = config["calib"]["num_runs"] if config.get("corrector") else "-"   # K only matters with a corrector
    eta = float((s.get("options") or {}).get("eta") or 0) if s["name"] == "ddim" else 0.0
    noise = f", eta {eta:g}" if eta else ""   # DDIM with its own noise
    return (f"qdrift  model={config['model']['name']}  sampler={s['name']} ({s['steps']} steps{noise}, "
            f"CFG {float(s['guidance']):g})  quant={config['quant']['name']}  K={k}  "
            f"prompts={num_prompts} ({config['eval']['prompt_set']})")


def format_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """A compact aligned text table, one row per variant (``-`` where a metric was not computed)."""
    header = ["variant", "FID", "KIDx1e3", "CLIP", "FID vs FP", "PSNR vs FP", "SSIM vs FP", "LPIPS vs FP"]
    header.append("FID delta [95% CI]")
    rows = []
    for name, m in metrics.items():
        delta_key = next((k for k in m if k.startswith("fid_delta_vs_")), None)
        delta = "-"
        if delta_key is not None:
            baseline = delta_key[len("fid_delta_vs_") :]
            delta = f"{m[delta_key]:+.3f} [{m['fid_delta_ci_low']:+.3f}, {m['fid_delta_ci_high']:+.3f}] vs {baseline}"
        kid_mean = m.get("kid_mean")
        rows.append(
            [
                name,
                _fmt(m.get("fid"), ".3f"),
                _fmt(None if kid_mean is None else 1e3 * kid_mean, ".3f"),
                _fmt(m.get("clip_score"), ".2f"),
                _fmt(m.get("fid_vs_fp"), ".3f"),
                _fmt(m.get("psnr_vs_fp"), ".2f"),
                _fmt(m.get("ssim_vs_fp"), ".4f"),
                _fmt(m.get("lpips_vs_fp"), ".4f"),
                delta,
            ]
        )
    keep = [j for j in range(len(header)) if j == 0 or any(r[j] != "-" for r in rows)]  # drop empty columns
    table = [[header[j] for j in keep]] + [[r[j] for j in keep] for r in rows]
    widths = [max(len(r[j]) for r in table) for j in range(len(keep))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
