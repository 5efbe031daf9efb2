#!/usr/bin/env python
"""Collect run directories (metrics.json) into the bench table: one row per setting and variant.

The table is a sweep of ordinary runs; on a GPU, for example:

    python run.py -m model=bench_dit,bench_unet quant=svdquant_w4a4,svdquant_w3a4,mixdq_w4a8 \
        corrector=all eval.num_prompts=2000 device=cuda batch_size=250 logger=none
    python run.py -m model=bench_flow sampler=flow_euler,dpmpp quant=svdquant_w4a4,svdquant_w3a4,mixdq_w4a8 \
        corrector=all eval.num_prompts=2000 device=cuda batch_size=250 logger=none
    python experiments/bench_table.py outputs/multirun > bench_table.md
    python experiments/bench_table.py --deltas outputs/multirun     # one row per setting
    python experiments/bench_table.py --deltas --gaps outputs/multirun   # over replicates, compact (README)

Replicates (`python run.py -m replicate=0,1,2 ...`, README "Replicates"): `--deltas` then gives one row per
setting over its replicates: their number, the mean FID delta and the mean gap recovered
(quant - corrected) / (quant - FP) per corrector, each with a 95% Student-t interval over replicates;
`--per-replicate` adds each replicate's own row with its paired bootstrap CI; `--versus CORRECTOR` compares
one corrector with each other one, paired by replicate (is it ahead of every peer?).

(`experiments/bench_table_sweep.sh` runs those sweeps spread over the visible GPUs.)
Every run found under the given folders is listed, including settings where a corrector does not help.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from qdrift.conf import all_correctors
from qdrift.report import (drop_reruns, has_replicates, load_runs, replicate_groups, replicate_rows, replicate_summary,
                           setting_value, varying_keys, versus_summary)

COLUMNS = ("model", "sampler", "steps", "quant", "K", "prompts", "variant", "FID", "KID x1e3 (± std)",
           "CLIP [95% CI]", "FID delta vs quant [95% CI]")
CORRECTOR_ORDER = all_correctors()
SETTING_KEYS = ("model.name", "sampler.name", "sampler.steps", "quant.name")   # the first two columns


def sampler_label(sampler: dict) -> str:
    """The sampler's name, with DDIM's eta when it adds noise (runs of another eta are another setting)."""
    eta = float((sampler.get("options") or {}).get("eta") or 0)
    return f"{sampler['name']} eta={eta:g}" if eta else sampler["name"]


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _delta(m: dict) -> str:
    """FID delta vs quant [95% CI], or '-' for variants without one (fp, quant)."""
    if "fid_delta_vs_quant" not in m:
        return "-"
    return f"{m['fid_delta_vs_quant']:+.4f} [{m['fid_delta_ci_low']:+.4f}, {m['fid_delta_ci_high']:+.4f}]"


def rows(metrics_file: Path) -> list[list[str]]:
    result = json.loads(metrics_file.read_text())
    cfg = result["config"]
    setting = [cfg["model"]["name"], sampler_label(cfg["sampler"]), str(cfg["sampler"]["steps"]),
               cfg["quant"]["name"], str(cfg["calib"]["num_runs"]), str(result.get("num_prompts", "?"))]
    out = []
    order = sorted(result["variants"], key=lambda v: (v != "fp", v != "quant", v))   # fp, quant, then correctors
    for variant in order:
        m = result["variants"][variant]
        kid = _num(1e3 * m["kid_mean"] if "kid_mean" in m else None, ".3f")
        if "kid_std" in m:
            kid += f" ± {1e3 * m['kid_std']:.3f}"
        clip = _num(m.get("clip_score"), ".2f")
        if "clip_score_ci_low" in m:
            clip += f" [{m['clip_score_ci_low']:.2f}, {m['clip_score_ci_high']:.2f}]"
        out.append(setting + [variant, _num(m.get("fid"), ".4f"), kid, clip, _delta(m)])
    return out


def delta_rows(result: dict, correctors: list[str]) -> list[str]:
    """One row per setting (a run's metrics, with any joined correctors): FID of FP and quantized, then each
    corrector's FID delta [95% CI]."""
    cfg, v = result["config"], result["variants"]
    out = [f"{cfg['model']['name']} / {sampler_label(cfg['sampler'])}, {cfg['sampler']['steps']}",
           cfg["quant"]["name"], f"{v['fp']['fid']:.4f} / {v['quant']['fid']:.4f}"]
    return out + [_delta(v.get(c, {})) for c in correctors]


def gap_rows(runs: list, correctors: list[str]) -> tuple[list[str], list[list[str]]]:
    """The README's compact view over replicates: per setting the mean FID of FP and quantized, then per
    corrector its mean gap recovered with its 95% t-interval, in bold where the FID delta's t-interval
    over replicates is below zero and marked "(worse)" where it is above zero. Setting keys besides
    model, sampler and quantizer (K, a sweep's other keys) get a column each."""
    extra, settings = _settings(runs)
    out = []
    for prefix, members in settings:
        s = replicate_summary(members, correctors)
        row = prefix + [str(s["n"]), f"{s['fp']:.4f} / {s['quant']:.4f}" if None not in (s["fp"], s["quant"]) else "-"]
        for c in correctors:
            gap, delta = s[c]["gap"], s[c]["delta"]
            if gap is None:
                row.append("-")
                continue
            cell = f"{100 * gap[0]:+.0f} %" + (f" [{100 * gap[1]:+.0f}, {100 * gap[2]:+.0f}]"
                                                if math.isfinite(gap[1]) else "")
            if delta is not None and delta[2] < 0:        # NaN bounds (one replicate) mark nothing
                cell = f"**{cell}**"
            elif delta is not None and delta[1] > 0:
                cell += " (worse)"
            row.append(cell)
        out.append(row)
    return ["model / sampler, steps", "quant", *extra, "replicates", "FID fp / quant", *correctors], _sorted(out)


def versus_rows(runs: list, ref: str, correctors: list[str]) -> tuple[list[str], list[list[str]]]:
    """`ref` against each other corrector, per setting over the replicates where both ran: the gap
    recovered by ref minus the other's, in percentage points with its 95% t-interval over the paired
    replicates. Bold where ref is ahead in a way that replicates: that interval above zero and the FID
    difference's below zero (the two disagree only when replicates' FP-quantized gaps differ a lot or
    change sign, and then nothing is marked); "(behind)" for the reverse."""
    if ref not in correctors:
        raise ValueError(f"no run has the corrector {ref!r} to compare against (correctors found: "
                         f"{', '.join(correctors) or 'none'})")
    others = [c for c in correctors if c != ref]
    if not others:
        raise ValueError(f"the runs have no corrector besides {ref!r} to compare it with")
    extra, settings = _settings(runs)
    out = []
    for prefix, members in settings:
        v = versus_summary(members, ref, others)
        row = prefix + [str(len(members))]
        for c in others:
            gap, fid = v[c]["gap"], v[c]["fid"]
            if gap is None:
                row.append("-")
                continue
            cell = f"{100 * gap[0]:+.0f} pp" + (f" [{100 * gap[1]:+.0f}, {100 * gap[2]:+.0f}]" if math.isfinite(gap[1]) else "")
            cell += f" (n={v[c]['n']})" if v[c]["n"] != len(members) else ""
            if gap[1] > 0 and fid[2] < 0:          # NaN bounds (one replicate) mark nothing
                cell = f"**{cell}**"
            elif gap[2] < 0 and fid[1] > 0:
                cell += " (behind)"
            row.append(cell)
        out.append(row)
    return ["model / sampler, steps", "quant", *extra, "replicates", *(f"{ref} - {c}" for c in others)], _sorted(out)


def _settings(runs: list) -> tuple[list[str], list[tuple[list[str], list]]]:
    """(extra setting keys, [(the row's setting cells, the setting's replicates)]): model / sampler and
    quantizer, then each other key that differs between settings (K, a sweep's other keys)."""
    keys, groups = replicate_groups(runs)
    extra = [k for k in keys if k not in SETTING_KEYS and len({values[keys.index(k)] for values, _ in groups}) > 1]
    out = []
    for values, members in groups:
        cfg = members[0].config
        out.append(([f"{cfg['model']['name']} / {sampler_label(cfg['sampler'])}, {cfg['sampler']['steps']}",
                     cfg["quant"]["name"], *(values[keys.index(k)] for k in extra)], members))
    return extra, out


def _sorted(rows: list[list[str]]) -> list[list[str]]:
    quant_order = ["svdquant_w4a4", "svdquant_w3a4", "mixdq_w4a8"]
    return sorted(rows, key=lambda r: (r[0], quant_order.index(r[1]) if r[1] in quant_order else len(quant_order), r[1:]))


def markdown(all_rows: list[list[str]], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in all_rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=Path, help="run directories or folders holding them (searched recursively)")
    p.add_argument("--deltas", action="store_true",
                   help="one row per setting: FID fp / quant and each corrector's FID delta vs quant [95%% CI]; "
                        "replicates of a setting are aggregated (mean and 95%% t-interval over replicates)")
    p.add_argument("--per-replicate", action="store_true",
                   help="with --deltas and replicates: also each replicate's row with its own paired CI")
    p.add_argument("--gaps", action="store_true",
                   help="with --deltas and replicates: one cell per corrector, its mean gap recovered [95%% t-CI], "
                        "bold where the FID delta's CI over replicates is below zero, '(worse)' where above")
    p.add_argument("--versus", metavar="CORRECTOR",
                   help="with replicates: CORRECTOR against each other corrector, per setting: the difference in "
                        "gap recovered (percentage points) with its 95%% t-interval over paired replicates, bold "
                        "where CORRECTOR is significantly ahead (that interval and the FID difference's agree), "
                        "'(behind)' where significantly behind")
    args = p.parse_args(argv)
    args.deltas |= args.gaps or args.per_replicate or bool(args.versus)   # all are views of --deltas
    files = sorted({f for root in args.roots for f in ([root / "metrics.json"] if (root / "metrics.json").is_file()
                                                       else root.rglob("metrics.json"))})
    if not files:
        print(f"error: no metrics.json under {', '.join(map(str, args.roots))}", file=sys.stderr)
        return 2
    if args.deltas:
        found = {c for f in files for c in json.loads(f.read_text())["variants"]} - {"fp", "quant"}
        correctors = [c for c in CORRECTOR_ORDER if c in found] + sorted(found - set(CORRECTOR_ORDER))
        # Keys that differ between the runs besides model, sampler and quantizer (K, a sweep's other keys)
        # get a column each, so two rows of a sweep never print alike.
        try:
            runs = {r.path / "metrics.json": r for r in drop_reruns(load_runs([f.parent for f in files]))}
        except ValueError as err:   # two runs that are one replicate of one setting, with different results
            print(f"error: {err}", file=sys.stderr)
            return 2
        files = sorted(runs)
        if args.versus and (args.gaps or args.per_replicate):
            print("error: --versus is a view of its own; give it without --gaps or --per-replicate", file=sys.stderr)
            return 2
        if args.versus and not has_replicates(list(runs.values())):
            print("error: --versus compares correctors over replicates; these runs have none", file=sys.stderr)
            return 2
        if args.versus:
            try:
                header, table = versus_rows(list(runs.values()), args.versus, correctors)
            except ValueError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            print(markdown(table, header))
            return 0
        if has_replicates(list(runs.values())):
            header, table = (gap_rows(list(runs.values()), correctors) if args.gaps else
                             replicate_rows(list(runs.values()), args.per_replicate, correctors))
            print(markdown(table, header))
            return 0
        swept = [k for k in varying_keys(list(runs.values())) if k not in SETTING_KEYS
                 and len({setting_value(r, k) for r in runs.values()}) > 1]

        def row(f):
            r = runs[f]
            extra = [setting_value(r, k) for k in swept]
            base = delta_rows(r.metrics, correctors)
            return base[:2] + extra + base[2:]
        table = sorted((row(f) for f in files), key=lambda r: r[:2 + len(swept)])
        print(markdown(table, ["model / sampler, steps", "quant", *swept, "FID fp / quant", *correctors]))
        return 0
    if has_replicates(load_runs([f.parent for f in files])):
        print("note: some settings have several replicates (rows of a setting differ in replicate only); "
              "--deltas aggregates them", file=sys.stderr)
    all_rows = [r for f in files for r in rows(f)]
    all_rows.sort(key=lambda r: tuple(r[:4]))      # stable: variants keep their run order
    print(markdown(all_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
