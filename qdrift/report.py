"""A local report of runs and sweeps: one self-contained HTML page, plus the table as CSV and Markdown.

    python -m qdrift.report outputs/multirun/2026-11-30/12-00-00_ab12cd --out report.html
    qdrift report RUN_OR_SWEEP_DIR [...] --out report.html

Every run directory below the given paths (those with metrics.json) is one row. The table keeps
every config key whose value differs between the runs (a sweep's swept keys), and per variant FID,
KID, CLIP, the FID delta vs the quantized model [95% CI] and the gap recovered,
(FID quant - FID corrected) / (FID quant - FID FP). Runs of one setting that differ only in the
replicate keys (`replicate`, `quant.seed`, `eval.split`, `seed`, `calib.seed`) also make a table over
replicates: per corrector the mean FID delta and mean gap recovered with 95% Student-t intervals.
Figures are PNGs embedded in the page, so it opens anywhere without network; image grids show the
same prompts for every variant. Runs that kept raw calibration samples (stats/samples.safetensors)
also get the paper's Fig. 4 and Fig. 5.
"""
from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

BASELINES = ("fp", "quant")
FIXED = ("model.name", "sampler.name", "sampler.steps", "quant.name", "calib.num_runs")
GROUPS_IN_FIXED = ("model", "sampler", "quant")   # their option names are the fixed columns' *.name
IGNORED = ("output_root", "cache_dir", "logger", "device", "batch_size", "cuda_graph")   # numbers do not depend on them
SAMPLES_FILE = "samples.safetensors"   # a run's raw calibration samples in stats/ (stages/calibrate.py)


@dataclass
class Run:
    path: Path
    metrics: dict
    config: dict
    overrides: list[str]
    stats: dict | None = None
    flat: dict = field(default_factory=dict)
    joined: list[Path] = field(default_factory=list)   # runs whose correctors drop_reruns joined to this one

    @property
    def variants(self) -> dict:
        return self.metrics["variants"]

    @property
    def correctors(self) -> list[str]:
        return [v for v in self.variants if v not in BASELINES]

    def command(self) -> str:
        return "python run.py " + " ".join(self.overrides)


def load_runs(paths: list[Path]) -> list[Run]:
    """Every run directory (one with metrics.json) at or below `paths`, in path order."""
    runs, seen = [], set()
    for root in paths:
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        found = [root / "metrics.json"] if (root / "metrics.json").is_file() else sorted(root.rglob("metrics.json"))
        for m in found:
            d = m.parent
            if d.resolve() in seen:   # named twice (a run and its sweep folder): one row
                continue
            seen.add(d.resolve())
            metrics = json.loads(m.read_text())
            overrides_file = d / ".hydra" / "overrides.yaml"
            overrides = list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
            stats_file = next((f for f in (d / "stats" / "summary.json", d / "stats_summary.json") if f.is_file()), None)
            run = Run(d, metrics, metrics["config"], [str(o) for o in overrides],
                      json.loads(stats_file.read_text()) if stats_file else None)
            run.flat = _flatten(run.config)
            runs.append(run)
    if not runs:
        raise FileNotFoundError(f"no run directory (with metrics.json) under {', '.join(map(str, paths))}")
    return runs


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not key.startswith("corrector"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v
    return out


def varying_keys(runs: list[Run]) -> list[str]:
    """The setting's columns: the fixed ones, then every overridden key whose value differs between runs
    (a sweep's swept keys; a config group such as `corrector` counts by its option name)."""
    named = sorted({o.split("=", 1)[0].lstrip("+~") for r in runs for o in r.overrides if "=" in o})
    varying = [k for k in named if k not in FIXED and k not in GROUPS_IN_FIXED and not k.startswith(IGNORED)
               and not k.startswith("hydra") and len({setting_value(r, k) for r in runs}) > 1]
    if "corrector" in varying and not _needs_corrector_key(runs, [*FIXED, *varying]):
        varying.remove("corrector")   # each run's correctors are its columns; the option name tells nothing more
    return [*FIXED, *varying]


def _needs_corrector_key(runs: list[Run], keys: list[str]) -> bool:
    """The `corrector` option is a setting key only where it keeps apart two runs that are otherwise one
    replicate of one setting (runs drop_reruns could not join)."""
    others = [k for k in keys if k != "corrector"]
    seen = set()
    for r in runs:
        ident = (tuple(setting_value(r, k) for k in others), replicate_id(r))
        if ident in seen:
            return True
        seen.add(ident)
    return False


def _override(run: Run, key: str) -> str:
    values = [o.split("=", 1)[1] for o in run.overrides if o.split("=", 1)[0].lstrip("+~") == key]
    return values[-1] if values else ""


def setting_value(run: Run, key: str) -> str:
    """A setting column's value: a fixed column's from the config; another as given on the command
    line (a group by its option name), else the config's value of a plain key."""
    if key in FIXED:
        return str(run.flat.get(key))
    given = _override(run, key)
    if given or key not in run.flat:
        return given
    value = str(run.flat[key])
    return "" if value.startswith("{") else value


def gap_recovered(m: dict, variant: str) -> tuple[float, float, float] | None:
    """(gap, low, high): the share of the FP-to-quantized FID gap a corrector closes, with the 95% CI
    of its paired FID delta mapped onto that scale (the FP-quantized gap taken as fixed)."""
    try:
        fp, q, c = m["fp"]["fid"], m["quant"]["fid"], m[variant]["fid"]
    except KeyError:
        return None
    gap = q - fp
    if not gap or math.isclose(gap, 0.0):
        return None
    v = m[variant]
    lo, hi = v.get("fid_delta_ci_low"), v.get("fid_delta_ci_high")
    if lo is None or hi is None:
        return ((q - c) / gap, math.nan, math.nan)
    low, high = sorted((-hi / gap, -lo / gap))   # a negative gap (quantized better than FP) flips them
    return ((q - c) / gap, low, high)


# What `replicate=r` sets (README, "Replicates"): runs that differ only in these are replicates of one setting.
REPLICATE_KEYS = ("replicate", "quant.seed", "eval.split", "seed", "calib.seed")


def replicate_id(run: Run) -> tuple:
    """The run's replicate: its values of the replicate keys (runs from before replicates: split 0)."""
    defaults = {"replicate": 0, "eval.split": 0}
    return tuple(run.flat.get(k, defaults.get(k)) for k in REPLICATE_KEYS)


def replicate_groups(runs: list[Run], strict: bool = True,
                     join_correctors: bool = False) -> tuple[list[str], list[tuple[list[str], list[Run]]]]:
    """(setting keys, [(setting values, its runs)]): runs grouped by every setting key but the replicate
    keys, in first-seen order. `strict`: two runs of one setting that are the same replicate are refused
    (a rerun would count twice; drop_reruns removes those with the same results). `join_correctors`: runs
    that differ in the `corrector` option only are one setting."""
    keys = [k for k in varying_keys(runs) if k not in REPLICATE_KEYS and not (join_correctors and k == "corrector")]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(tuple(setting_value(r, k) for k in keys), []).append(r)
    for members in groups.values() if strict else ():
        seen: dict[tuple, Run] = {}
        for r in members:
            other = seen.setdefault(replicate_id(r), r)
            if other is not r:
                raise ValueError(f"{other.path} and {r.path} are the same replicate of one setting "
                                 f"({dict(zip(REPLICATE_KEYS, replicate_id(r)))}); keep one of them")
    return keys, [(list(values), members) for values, members in groups.items()]


def drop_reruns(runs: list[Run]) -> list[Run]:
    """The runs without reruns, and with correctors added later joined in. A run that is the same
    replicate of one setting (the `corrector` option aside) as a run kept before it:
    - with the same metrics, every variant's and every number (a resumed sweep's job run again from the
      cache), is dropped;
    - with the same config (correctors, output paths and batch sizes aside), FP and quantized metrics that
      agree (relative 1e-6) and no shared corrector that differs (a corrector run later on the same
      replicate, perhaps on another machine and cache), has its correctors joined to that run's, as if
      one run had made them all;
    - otherwise is refused, unless it names another `corrector` option than every such run (then it
      keeps its own row).
    Each drop and join is noted on stderr."""
    kept: dict[tuple, list[Run]] = {}
    options: dict[tuple, dict[str, Path]] = {}   # corrector option -> a run of it, kept or joined
    for values, members in replicate_groups(runs, strict=False, join_correctors=True)[1]:
        for r in members:
            ident = (tuple(values), replicate_id(r))
            before, seen = kept.setdefault(ident, []), options.setdefault(ident, {})
            option = setting_value(r, "corrector")
            same = next((o for o in before if _results(o) == _results(r)), None)
            into = next((o for o in before if _joinable(o, r)), None)
            if same is not None:
                print(f"note: {r.path} repeats {same.path} (same replicate, same metrics): counted once", file=sys.stderr)
            elif into is not None:
                _join(into, r)
            elif option in seen:
                raise ValueError(f"{seen[option]} and {r.path} are the same replicate of one setting "
                                 f"({dict(zip(REPLICATE_KEYS, replicate_id(r)))}) with different variants or "
                                 "metrics; keep one of them")
            else:
                before.append(r)
            seen.setdefault(option, r.path)
    keep = {id(r) for members in kept.values() for r in members}
    return [r for r in runs if id(r) in keep]


def _same_numbers(a: dict, b: dict) -> bool:
    """Two variants' metrics agree: the same keys, numbers equal to a relative 1e-6 (another GPU may
    change the last digits; another quantized model or prompt set changes far more)."""
    return a.keys() == b.keys() and all(
        math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-12) if isinstance(a[k], float) and isinstance(b[k], float)
        and math.isfinite(a[k]) and math.isfinite(b[k]) else json.dumps(a[k]) == json.dumps(b[k]) for k in a)


def _joinable(a: Run, b: Run) -> bool:
    if a.metrics.get("num_prompts") != b.metrics.get("num_prompts") or _base_config(a) != _base_config(b):
        return False
    shared = set(a.variants) & set(b.variants)
    return set(BASELINES) <= shared and all(_same_numbers(a.variants[v], b.variants[v]) for v in shared)


def _base_config(r: Run) -> dict:
    """The run's config without what a joined corrector may differ in: its correctors, where outputs go,
    batch sizes of the images (no number depends on them)."""
    return {k: v for k, v in r.flat.items() if not k.startswith(("corrector", *IGNORED))}


def _join(into: Run, r: Run) -> None:
    added = [v for v in r.variants if v not in into.variants]
    if not added:   # every variant already there, with the same numbers
        print(f"note: {r.path} repeats {into.path} (same replicate, same metrics): counted once", file=sys.stderr)
        return
    into.metrics = {**into.metrics, "variants": {**into.variants, **{v: r.variants[v] for v in added}}}
    into.joined.append(r.path)
    print(f"note: {r.path} is the same replicate as {into.path} (FP and quantized metrics agree): "
          f"its {', '.join(added)} joined", file=sys.stderr)


def _results(run: Run) -> str:
    return json.dumps(run.variants, sort_keys=True)   # NaN is written as NaN, so equal runs compare equal


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean over replicates and its Student-t interval (NaN bounds for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def fid_delta(m: dict) -> float | None:
    """A corrector's FID delta vs the quantized model (negative: closer to the references)."""
    return next((m[k] for k in m if k.startswith("fid_delta_vs_")), None)


def replicate_summary(members: list[Run], correctors: list[str]) -> dict:
    """Per corrector over the replicates that have it: n, the FID delta's and the gap recovered's
    (mean, low, high); plus the mean FID of FP and quantized."""
    out = {"n": len(members)}
    for base in BASELINES:
        fids = [r.variants[base]["fid"] for r in members if r.variants.get(base, {}).get("fid") is not None]
        out[base] = sum(fids) / len(fids) if fids else None
    for c in correctors:
        deltas = [d for r in members if (d := fid_delta(r.variants.get(c, {}))) is not None]
        gaps = [g[0] for r in members if c in r.variants and (g := gap_recovered(r.variants, c)) is not None]
        out[c] = {"n": len(deltas), "delta": t_interval(deltas) if deltas else None,
                  "gap": t_interval(gaps) if gaps else None}
    return out


def versus_summary(members: list[Run], ref: str, correctors: list[str]) -> dict:
    """Per corrector c other than `ref`, over the replicates where both have a finite FID and a gap to
    recover: n, the FID difference FID[ref] - FID[c] and the gap-recovered difference gap[ref] - gap[c],
    each (mean, low, high) with a Student-t interval. Paired by replicate, so the PTQ draw's share of the
    variation cancels; both intervals come from the same replicates."""
    out = {}
    for c in correctors:
        if c == ref:
            continue
        fid, gap = [], []
        for r in members:
            g_ref, g_c = gap_recovered(r.variants, ref), gap_recovered(r.variants, c)   # None: no FID to pair
            if g_ref is None or g_c is None:
                continue
            a, b = r.variants[ref]["fid"], r.variants[c]["fid"]
            if not (math.isfinite(a) and math.isfinite(b)):
                continue
            fid.append(a - b)
            gap.append(g_ref[0] - g_c[0])
        out[c] = {"n": len(fid), "fid": t_interval(fid) if fid else None, "gap": t_interval(gap) if gap else None}
    return out


def _ci(x: tuple | None, spec: str, scale: float = 1.0, unit: str = "") -> str:
    if x is None:
        return "-"
    mean, low, high = (scale * v for v in x)
    if math.isnan(low):
        return f"{mean:{spec}}{unit}"
    return f"{mean:{spec}}{unit} [{low:{spec}}, {high:{spec}}]"


def replicate_rows(runs: list[Run], per_replicate: bool = False,
                   correctors: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """One row per setting over its replicates: n, mean FID of FP and quantized, per corrector the mean
    FID delta and the mean gap recovered with their 95% t-intervals over replicates. `per_replicate`:
    each replicate's own row below, with its paired bootstrap CIs."""
    keys, groups = replicate_groups(runs)
    if correctors is None:
        correctors = list(dict.fromkeys(v for r in runs for v in r.correctors))
    header = [*keys, "replicates", "fp FID", "quant FID"]   # replicates: n, or one replicate's keys
    for c in correctors:
        header += [f"{c} FID delta [95% t-CI]", f"{c} gap recovered [95% t-CI]"]
    rows = []
    for values, members in groups:
        s = replicate_summary(members, correctors)
        row = [*values, str(s["n"]), _f(s["fp"], ".4f"), _f(s["quant"], ".4f")]
        for c in correctors:
            row += [_ci(s[c]["delta"], "+.4f"), _ci(s[c]["gap"], "+.0f", 100, " %")]
        rows.append(row)
        if per_replicate:
            for r in sorted(members, key=lambda r: [(v is None, v or 0) for v in replicate_id(r)]):
                label = " ".join(f"{k}={v}" for k, v in zip(REPLICATE_KEYS, replicate_id(r)))
                fp, quant = (r.variants.get(b, {}).get("fid") for b in BASELINES)
                row = [*values, label, _f(fp, ".4f"), _f(quant, ".4f")]
                for c in correctors:
                    m = r.variants.get(c, {})
                    d = fid_delta(m)
                    row.append("-" if d is None else
                               f"{d:+.4f} [{m['fid_delta_ci_low']:+.4f}, {m['fid_delta_ci_high']:+.4f}] (paired)")
                    g = gap_recovered(r.variants, c) if c in r.variants else None
                    row.append(_ci(g, "+.0f", 100, " %") + (" (paired)" if g is not None else ""))
                rows.append(row)
    return header, rows


def has_replicates(runs: list[Run]) -> bool:
    """Whether some setting among the runs has more than one replicate (reruns of one replicate do not count)."""
    return any(len({replicate_id(r) for r in members}) > 1 for _, members in replicate_groups(runs, strict=False)[1])


def table_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    keys = varying_keys(runs)
    variants = list(dict.fromkeys([*BASELINES, *(v for r in runs for v in r.variants)]))
    header = [*keys]
    for v in variants:
        header += [f"{v} FID", f"{v} KIDx1e3", f"{v} CLIP"]
        if v not in BASELINES:
            header += [f"{v} FID delta [95% CI]", f"{v} gap recovered [95% CI]"]
    rows = []
    for r in runs:
        row = [setting_value(r, k) for k in keys]
        for v in variants:
            m = r.variants.get(v, {})
            row += [_f(m.get("fid"), ".4f"), _f(None if m.get("kid_mean") is None else 1e3 * m["kid_mean"], ".3f"),
                    _f(m.get("clip_score"), ".2f")]
            if v not in BASELINES:
                delta = fid_delta(m)
                row.append("-" if delta is None else
                           f"{delta:+.4f} [{m['fid_delta_ci_low']:+.4f}, {m['fid_delta_ci_high']:+.4f}]")
                g = gap_recovered(r.variants, v) if v in r.variants else None
                row.append("-" if g is None else f"{100 * g[0]:+.0f} % [{100 * g[1]:+.0f}, {100 * g[2]:+.0f}]")
        rows.append(row)
    return header, rows


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_label(r: Run, keys: list[str]) -> str:
    short = {"calib.num_runs": "K", "sampler.name": "sampler", "sampler.steps": "steps", "model.name": "model",
             "quant.name": "quant"}
    return " ".join(f"{short.get(k, k)}={setting_value(r, k)}" for k in keys)


def write_report(paths: list[Path], out: Path, grid_prompts: int = 6, per_replicate: bool = False) -> dict[str, Path]:
    """Render the page and the table files; returns their paths. Settings run as several replicates also
    get the table over replicates (`<out>.replicates.md`; `per_replicate`: with each replicate's row)."""
    from qdrift import figures

    runs = drop_reruns(load_runs(paths))   # refuses a differing copy of a replicate before any file is written
    header, rows = table_rows(runs)
    replicates = replicate_rows(runs, per_replicate) if has_replicates(runs) else None
    keys = varying_keys(runs)
    # Figure labels name only what differs between the runs.
    differ = [k for k in keys if len({run_label(r, [k]) for r in runs}) > 1] or keys[:1]
    labels = [run_label(r, differ) for r in runs]
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    md_path.write_text(markdown(header, rows))
    if replicates is not None:
        rep_path = out.with_suffix(".replicates.md")
        rep_path.write_text(markdown(*replicates))

    figs = {"Gap recovered per setting (95% CI)": figures.gap_recovered_figure(
        labels, [{v: gap_recovered(r.variants, v) for v in r.correctors} for r in runs])}
    k_sweep = figures.fid_vs_k_groups(runs, keys)
    if k_sweep:
        figs["FID vs K"] = figures.fid_vs_k_figure(k_sweep)
    pools = [(r.path / "stats" / "pool.safetensors", lab) for lab, r in zip(labels, runs)
             if (r.path / "stats" / "pool.safetensors").is_file()]
    if pools:   # the largest calibration pool among the runs
        from qdrift.drift import CalibrationPool

        loaded = [(CalibrationPool.load(path), lab) for path, lab in pools]
        pool, lab = max(loaded, key=lambda item: item[0].num_runs)
        png = figures.calibration_size_figure(pool)
        if png is not None:
            figs[f"Calibration size: V_i from K runs ({lab})"] = png
    stats = [(lab, r.stats) for lab, r in zip(labels, runs) if r.stats]
    if stats:
        figs["Residual variance V_i per step"] = figures.residual_variance_figure(stats)
    factors = [(lab, s) for lab, s in stats if s.get("drift_factors")]
    if factors:
        figs["Drift factor c_i per step"] = figures.drift_factor_figure(factors)

    parts = [f"<h1>qdrift report</h1><p>{len(runs)} run(s) from {html.escape(', '.join(map(str, paths)))}</p>",
             "<h2>Table</h2>", _html_table(header, rows)]
    if replicates is not None:
        parts += ["<h2>Over replicates (mean, 95% t-interval over replicates)</h2>", _html_table(*replicates)]
    for title, png in figs.items():
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='{_data_uri(png)}'>")
    parts += error_sample_section(runs, labels, keys)
    parts.append("<h2>Runs</h2>")
    for lab, r in zip(labels, runs):
        joined = "".join(f"<br><small>joined: {html.escape(str(j))}</small>" for j in r.joined)
        parts.append(f"<h3>{html.escape(run_label(r, keys))}</h3><p><code>{html.escape(r.command())}</code><br>"
                     f"<small>{html.escape(str(r.path))}</small>{joined}</p>")
        grid = figures.image_grid(r.path, r.metrics.get("num_prompts", 0), grid_prompts, tuple(r.joined))
        if grid is not None:
            parts.append(f"<img alt='image grid' src='{_data_uri(grid)}'>")
    out.write_text(PAGE.format(body="\n".join(parts)))
    return {"html": out, "csv": csv_path, "md": md_path} | ({"replicates": rep_path} if replicates else {})


def error_sample_section(runs: list[Run], labels: list[str], keys: list[str]) -> list[str]:
    """Fig. 4 and Fig. 5 from the raw calibration samples a run keeps (stats/samples.safetensors), for
    one run per setting (runs that differ only in K share their calibration runs: the one with the
    most); runs without them are named in a note."""
    from qdrift import figures

    chosen: dict[str, tuple[int, str, Path]] = {}
    without = []
    for lab, r in zip(labels, runs):
        path = r.path / "stats" / SAMPLES_FILE
        if not path.is_file():
            without.append(lab)
            continue
        setting = json.dumps({k: setting_value(r, k) for k in keys if k != "calib.num_runs"}, sort_keys=True)
        size = int((r.stats or {}).get("pool_runs", 0))
        if setting not in chosen or size > chosen[setting][0]:
            chosen[setting] = (size, lab, path)
    parts = ["<h2>Error samples: Gaussianity (Fig. 4) and correlations (Fig. 5)</h2>",
             "<p>From the raw output u and error e = u_quant - u_fp that calibration keeps per run (first, "
             "middle and last step): u and e at one latent coordinate over the calibration runs, with fitted "
             "normals and a Shapiro-Wilk p (Fig. 4); the off-diagonal correlations of e between coordinates "
             "of the first channels, against the same values shuffled over runs (Fig. 5). Few runs give "
             "little power: read them as one draw.</p>"]
    if without:
        parts.append(f"<p class='note'>No raw error samples ({SAMPLES_FILE}) in: "
                     f"{html.escape('; '.join(without))} (a run without a corrector, or calibrated by an older "
                     "version).</p>")
    if chosen:
        from qdrift.drift.samples import ErrorSamples
    for _, lab, path in chosen.values():
        try:
            samples = ErrorSamples.load(path)
            drawn = figures.error_sample_figures(samples)
        except ValueError as err:
            drawn = str(err)
        if isinstance(drawn, str):
            parts.append(f"<h4>{html.escape(lab)}</h4><p class='note'>Not drawn: {html.escape(drawn)}.</p>")
            continue
        gauss, corr = drawn
        parts.append(f"<h4>{html.escape(lab)}: {samples.num_runs} calibration runs</h4>"
                     f"<img alt='Fig. 4 gaussianity: {html.escape(lab)}' src='{_data_uri(gauss)}'>"
                     f"<img alt='Fig. 5 correlation: {html.escape(lab)}' src='{_data_uri(corr)}'>")
    return parts


def _html_table(header, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>qdrift report</title><style>
body {{ font-family: sans-serif; margin: 2em; }} table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }} img {{ max-width: 100%; }}
</style></head><body>
{body}
<script>/* for headless checks (tests/test_report.py): how many images decoded */
window.addEventListener("load", () => {{ const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.rendered = imgs.filter(i => i.complete && i.naturalWidth > 0).length; }});
</script>
</body></html>
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="qdrift report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="run directories, sweep directories or any folder above them")
    ap.add_argument("--out", type=Path, default=Path("report.html"))
    ap.add_argument("--grid-prompts", type=int, default=6, help="prompts per image grid")
    ap.add_argument("--per-replicate", action="store_true",
                    help="the table over replicates also lists each replicate with its own paired CI")
    args = ap.parse_args(argv)
    try:
        written = write_report(args.dirs, args.out, args.grid_prompts, args.per_replicate)
    except (FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
