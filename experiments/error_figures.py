"""The paper's Fig. 4 and Fig. 5 for a model and quantizer: raw paired samples of the output and error.

    python experiments/error_figures.py OUT [--runs 64] [--steps 0 10 19] [run.py overrides ...]

Loads the model and its quantized state as a run would (cached quantization is reused), runs N paired
FP / quantized trajectories the way Q-Drift calibrates (the quantized model is teacher-forced along
the FP trajectory), keeps the raw guided output u and error e = u_quant - u_fp at the chosen steps,
and writes OUT/gaussianity.png (u and e at one latent coordinate over the N runs, with fitted
normals) and OUT/correlation.png (correlations of e between 64 coordinates vs a shuffled baseline).
Uses calibration captions and seeds past the ones calibration uses, never evaluation prompts.
Every run's report already draws both figures from the few runs its calibration keeps
(stats/samples.safetensors, `qdrift report`); this script is for many more runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from qdrift import figures
from qdrift.config import resolve_device
from qdrift.drift.calibration import PairedAccumulator, TeacherForcing, TrajectoryRecorder
from qdrift.drift.hooks import wrap_scheduler
from qdrift.drift.layout import by_channel
from qdrift.prompts import prompt_set
from qdrift.quant import quant_enabled
from qdrift.stages.build import build
from qdrift.stages.context import RunContext
from qdrift.stages.quantize import quantize_stage
from qdrift.stages.sampling import call_pipeline

ROOT = Path(__file__).resolve().parents[1]
SEED_OFFSET = 9_000_000   # beyond Q-Drift's calibration seeds (calib.seed + k) and PTQ's (6,000,000 + quant.seed * 10,000,000)


class SampleAccumulator(PairedAccumulator):
    """The calibration accumulator that also keeps u and e, flattened per run, at chosen steps."""

    def __init__(self, num_steps: int, layout: str, keep: list[int]):
        super().__init__(num_steps, layout)
        self.keep, self.u, self.e = keep, {}, {}

    def add(self, i, u_quant, u_fp):
        super().add(i, u_quant, u_fp)
        if i in self.keep:
            u = by_channel(u_quant.detach().double(), self.layout)
            self.u.setdefault(i, []).append(u.reshape(u.shape[0], -1).cpu())
            self.e.setdefault(i, []).append((u - by_channel(u_fp.detach().double(), self.layout))
                                            .reshape(u.shape[0], -1).cpu())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", help="sampling steps to show (default: first, middle, last)")
    ap.add_argument("--coordinate", type=int, default=0, help="latent coordinate of the histograms")
    args, overrides = ap.parse_known_args()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["logger=none", *overrides])
    source = prompt_set(cfg.eval)
    ctx = RunContext(cfg, args.out, resolve_device(cfg.device), [], source)
    build(ctx)
    quantize_stage(ctx)
    steps = int(cfg.sampler.steps)
    keep = args.steps or [0, steps // 2, steps - 1]
    prompts = source.calib_prompts(args.runs)
    seeds = [int(cfg.calib.seed) + SEED_OFFSET + k for k in range(args.runs)]
    bs = int(cfg.batch_size)
    u: dict[int, list] = {}
    e: dict[int, list] = {}
    for start in range(0, args.runs, bs):
        p, s = prompts[start:start + bs], seeds[start:start + bs]

        def run(scheduler, quantized):
            with quant_enabled(ctx.denoiser, quantized):
                call_pipeline(ctx, p, s, scheduler, output_type="latent")

        recorder = TrajectoryRecorder()
        run(wrap_scheduler(ctx.base_scheduler, recorder), False)
        acc = SampleAccumulator(steps, ctx.family.latent_layout, keep)
        run(wrap_scheduler(ctx.base_scheduler, TeacherForcing(recorder, acc)), True)
        for i in keep:
            u.setdefault(i, []).extend(acc.u[i])
            e.setdefault(i, []).extend(acc.e[i])
    u = {i: torch.cat(v) for i, v in u.items()}
    e = {i: torch.cat(v) for i, v in e.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    c = args.coordinate
    hist = {f"step {i}": {"output u": u[i][:, c].numpy(), "error e": e[i][:, c].numpy()} for i in keep}
    (args.out / "gaussianity.png").write_bytes(figures.gaussianity_figure(hist))
    width = e[keep[0]].shape[1]
    coords = torch.linspace(0, width - 1, min(64, width)).long()   # spread over channels and positions
    corr = {f"step {i}": e[i][:, coords].numpy() for i in keep}
    (args.out / "correlation.png").write_bytes(figures.correlation_figure(corr))
    print(args.out / "gaussianity.png", args.out / "correlation.png")


if __name__ == "__main__":
    main()
