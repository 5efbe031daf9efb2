"""A saved W&B workspace that lays out qdrift's runs for review (W&B's own `wandb-workspaces` API).

    python -m qdrift.tracking.workspace --entity ME --project qdrift [--group sweep-...] [--save]

Sections: the gap recovered and FID per corrector (bars, one group of bars per run), FID and gap
recovered against K (scatter over runs, for a K sweep), the per-step history (V_i, the channel
spread and each Q-Drift variant's drift factor c_i against the sampling step), and the image panels
of every variant. Saving needs a W&B server (`wandb login`); without `--save` it only checks that
the definition builds and prints it.
"""
from __future__ import annotations

import argparse
import sys

from qdrift.conf import all_correctors

CORRECTORS = all_correctors()
VARIANTS = ("fp", "quant", *CORRECTORS)
DRIFT_CORRECTORS = ("qdrift", "qdrift_exact")   # the ones with per-step drift factors (QDrift.drift_factors)


def build_workspace(entity: str, project: str, name: str = "qdrift review", group: str | None = None):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    k = wr.Config("calib.num_runs")
    sections = [
        ws.Section(name="Correction vs quantized", panels=[
            wr.BarPlot(title="gap recovered (quant - corrected) / (quant - FP)",
                       metrics=[f"{c}/gap_recovered" for c in CORRECTORS]),
            wr.BarPlot(title="FID", metrics=[f"{v}/fid" for v in VARIANTS]),
            wr.BarPlot(title="FID delta vs quantized", metrics=[f"{c}/fid_delta_vs_quant" for c in CORRECTORS]),
        ]),
        ws.Section(name="Calibration size K", panels=[
            wr.ScatterPlot(title="Q-Drift FID vs K", x=k, y=wr.SummaryMetric("qdrift/fid"), log_x=True),
            wr.ScatterPlot(title="Q-Drift gap recovered vs K", x=k, y=wr.SummaryMetric("qdrift/gap_recovered"),
                           log_x=True),
        ]),
        ws.Section(name="Per sampling step", panels=[
            wr.LinePlot(title="residual variance V_i", x="step", y=["per_step/V_i"], log_y=True),
            wr.LinePlot(title="channel spread of V_i (std / mean)", x="step", y=["per_step/channel_spread"]),
            wr.LinePlot(title="drift factor c_i per corrector", x="step",
                        y=[f"per_step/{c}/drift_factor" for c in DRIFT_CORRECTORS]),
        ]),
        ws.Section(name="Images", panels=[
            wr.MediaBrowser(title="same prompts, every variant", media_keys=[f"samples/{v}" for v in VARIANTS]),
        ]),
    ]
    filters = [ws.Metric("Group") == group] if group else None   # W&B's run filter on the group column
    runset = ws.RunsetSettings(filters=filters) if filters else ws.RunsetSettings()
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections, runset_settings=runset)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entity", required=True)
    ap.add_argument("--project", default="qdrift")
    ap.add_argument("--name", default="qdrift review")
    ap.add_argument("--group", help="show only this group's runs (a sweep: sweep-<sweep dir name>)")
    ap.add_argument("--save", action="store_true", help="save it on the W&B server (needs `wandb login`)")
    args = ap.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, args.name, args.group)
    if args.save:
        workspace.save()
        print(workspace.url)
    else:
        for section in workspace.sections:
            print(f"{section.name}: " + ", ".join(p.title for p in section.panels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
