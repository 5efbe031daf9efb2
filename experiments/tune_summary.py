#!/usr/bin/env python
"""Summarise an Optuna tuning sweep (experiment=tune_qdrift_plus): its trials, the best one, and whether
the setting gets values of its own in conf/tuned.yaml.

    python run.py -m experiment=tune_qdrift_plus model=bench_unet quant=svdquant_w4a4 ...
    python experiments/tune_summary.py outputs/multirun/DATE/TIME_xxxx [MORE_SWEEPS_OF_ONE_STUDY ...] [--yaml]

The rule (README, "Beyond the paper"): a setting gets the best trial's values only when that trial's
paired 95% CI of the FID delta on the tune pool lies below zero; otherwise the setting keeps the default.
The best of many trials is picked on the prompts its CI comes from, so that CI is optimistic (no
correction for the number of trials): the evaluation replicates, on other prompts, are the test.
`--yaml` prints the conf/tuned.yaml entry, or nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

NUMBERS = ("drift_scale", "mean_removal")
SCHEDULE = ("drift_scale_end", "mean_removal_end")   # experiment=tune_qdrift_plus_sched's trials have them
CHOICES = ("infeasible",)          # in the table and the entry where the trials' configs have them
PARAMS = NUMBERS + SCHEDULE + CHOICES


def _fmt(value) -> str:
    return value if isinstance(value, str) else f"{value:.2f}"


def trial(m: Path, corrector: str) -> dict:
    """One finished trial's row from its metrics.json (ValueError naming the file if it is not one)."""
    try:
        result = json.loads(m.read_text())
        cfg, v = result["config"], result["variants"].get(corrector)
        if v is None or "fid_delta_vs_quant" not in v:
            raise ValueError(f"no FID delta for {corrector!r} (not a tuning run of it?)")
        if cfg["eval"].get("pool") != "tune":
            raise ValueError(f"evaluated on eval.pool={cfg['eval'].get('pool')!r}; tuning uses the tune pool only")
        return {
            "job": int(m.parent.name.split("_", 1)[0]),
            "setting": f"{cfg['model']['name']}/{cfg['sampler']['name']}/{cfg['quant']['name']}",
            "prompts": result["num_prompts"],
            **{k: float(cfg["corrector"][corrector][k]) for k in NUMBERS},
            **{k: float(cfg["corrector"][corrector][k]) for k in SCHEDULE
               if cfg["corrector"][corrector].get(k) is not None},
            **{k: str(cfg["corrector"][corrector][k]) for k in CHOICES if k in cfg["corrector"][corrector]},
            "delta": v["fid_delta_vs_quant"], "low": v["fid_delta_ci_low"], "high": v["fid_delta_ci_high"],
            "fid_fp": result["variants"]["fp"]["fid"], "fid_quant": result["variants"]["quant"]["fid"],
        }
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{m}: not a finished run's metrics ({type(e).__name__}: {e})") from e
    except ValueError as e:   # also int() of a folder name that is not a job number
        raise ValueError(f"{m}: {e}") from e


def trials(sweep: Path | list[Path], corrector: str) -> list[dict]:
    """One row per finished trial (a job folder with metrics.json), in job order; trials whose FID delta or
    CI is not a finite number (a diverged run) are left out with a note, never taken for the best.
    Several sweep folders (one study resumed from its Optuna storage, a folder per call) are numbered on
    from one another in the order given, each after every job folder of the one before (finished or
    not), as Optuna numbers them; their trials must share setting and prompt count."""
    folders = list(dict.fromkeys(p.resolve() for p in ([sweep] if isinstance(sweep, Path) else sweep)))
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a sweep folder")
    rows, offset = [], 0
    for folder in folders:
        mine = []
        for m in folder.glob("*/metrics.json"):
            row = trial(m, corrector)
            if all(math.isfinite(row[k]) for k in ("delta", "low", "high")):
                mine.append(row)
            else:
                print(f"note: {m}: FID delta {row['delta']} [{row['low']}, {row['high']}] is not finite; left out",
                      file=sys.stderr)
        if not mine:
            print(f"note: {folder}: no finished trial", file=sys.stderr)
        jobs = [int(d.name.split("_", 1)[0]) for d in folder.iterdir() if d.is_dir() and d.name.split("_", 1)[0].isdigit()]
        for row in mine:
            row["job"] += offset
        rows += mine
        offset += max(jobs, default=-1) + 1
    where = ", ".join(map(str, folders))
    if not rows:
        raise FileNotFoundError(f"{where}: no finished trials (*/metrics.json) with a finite FID delta")
    for key, what in (("setting", "settings"), ("prompts", "prompt counts")):
        values = {r[key] for r in rows}
        if len(values) > 1:
            raise ValueError(f"{where}: trials of several {what} {sorted(values)}; summarise one study at a time")
    keys = {frozenset(k for k in PARAMS if k in r) for r in rows}
    if len(keys) > 1:
        raise ValueError(f"{where}: trials tune different values ({' / '.join(sorted(', '.join(sorted(k)) for k in keys))}); "
                         "summarise one study at a time")
    return sorted(rows, key=lambda r: r["job"])


def best(rows: list[dict]) -> dict:
    """The trial with the lowest FID delta."""
    return min(rows, key=lambda r: r["delta"])


def decision(rows: list[dict]) -> dict | None:
    """The best trial if its CI lies below zero, else None (keep the default)."""
    top = best(rows)
    return top if top["high"] < 0 else None


def markdown(rows: list[dict], corrector: str) -> str:
    r0, top, chosen = rows[0], best(rows), decision(rows)
    params = [k for k in PARAMS if k in r0]
    lines = [f"{corrector} tuning on {r0['setting']}: {len(rows)} trials, {r0['prompts']} tune-pool prompts "
             f"(FP FID {r0['fid_fp']:.4f}, quantized {r0['fid_quant']:.4f})", "",
             "| trial | " + " | ".join(params) + " | FID delta vs quant [paired 95% CI] |",
             "|---|" + "---|" * len(params) + "---|"]
    for r in rows:
        mark = " **best**" if r is top else ""
        lines.append(f"| {r['job']} | " + " | ".join(_fmt(r[k]) for k in params)
                     + f" | {r['delta']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]{mark} |")
    lines.append("")
    lines.append(f"Decision: {'ship trial ' + str(chosen['job']) + ' (its CI lies below zero)' if chosen else 'keep the default (the best trial is not distinguishable from zero)'}.")
    return "\n".join(lines)


def yaml_entry(rows: list[dict]) -> str:
    chosen = decision(rows)
    if chosen is None:
        return ""
    return (f"  {chosen['setting']}:   # {len(rows)} trials, {chosen['prompts']} tune prompts: "
            f"{chosen['delta']:+.4f} [{chosen['low']:+.4f}, {chosen['high']:+.4f}]\n"
            + "".join(f"    {k}: {_fmt(chosen[k])}\n" for k in PARAMS if k in chosen))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", type=Path, nargs="+", help="the tuning sweep's folder (one job folder per trial); "
                    "several: one study resumed over several sweeps, numbered on in the order given")
    ap.add_argument("--corrector", default="qdrift_plus")
    ap.add_argument("--yaml", action="store_true", help="print the conf/tuned.yaml entry (nothing if the default stays)")
    args = ap.parse_args(argv)
    try:
        rows = trials(args.sweep, args.corrector)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(yaml_entry(rows) if args.yaml else markdown(rows, args.corrector), end="" if args.yaml else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
