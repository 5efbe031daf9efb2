#!/usr/bin/env python
"""Train the qdrift bench models and export them as the package's weights (qdrift/bench/weights).

Stages, in dependency order: vae (latent space of the generators), clip (the evaluation CLIP,
independent), dit / unet / flow (generators, each with its own text encoder(s) trained jointly), and
report (samples every generator at its default sampler and scores FP vs random weights with the CLIP).

    python experiments/train_bench.py --stage all --minutes 8.5 --out qdrift/bench/weights --ckpt outputs/bench_ckpt
    python experiments/train_bench.py --tiny --stage all --out /tmp/benchout --ckpt /tmp/benchckpt   # CPU smoke run

Each invocation stops by itself inside --minutes (wall clock from process start): a stage that does not
fit is left for the next invocation (stage boundary), a stage cut short is checkpointed in --ckpt and
resumed exactly. --out holds only the exported files (<= 7, each < 16 MB) and train_report.json, which
records every invocation's command, seeds, steps, losses and GPU minutes; a stage whose export is in
--out is done, so a fresh --ckpt resumes from --out alone.

A finished generator trains further with --extend: it starts from its exported (EMA, fp16) weights with a
fresh optimizer, which is what survives a GPU box that is handed back between invocations (a checkpoint with
optimizer state is over the 16 MB a call brings back). Each extension is one segment in the report:

    python experiments/train_bench.py --stage dit --extend --stage-minutes dit=8 --minutes 9.5

Stages trained at the same time on several GPUs each write into their own copy of --out; --merge brings the
stages they trained, and their invocations, back into --out:

    python experiments/train_bench.py --merge /tmp/w/dit /tmp/w/unet --out qdrift/bench/weights
"""
from __future__ import annotations

import time

_T0 = time.monotonic()   # the --minutes budget counts imports and data preparation too

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # a GPU box runs it from a checkout, uninstalled

from qdrift.bench import configs, models  # noqa: E402
from qdrift.bench.objectives import DenoisingLoss, clip_loss, drop_captions, vae_loss  # noqa: E402
from qdrift.bench.traindata import TrainData, encode_latents, prepare  # noqa: E402
from qdrift.bench.trainloop import Budget, StagePlan, StageRun, param_count  # noqa: E402
from qdrift.bench.weights import REPORT_FILE  # noqa: E402

STAGES = ("vae", "clip", "dit", "unet", "flow", "report")
GENERATOR_OF = {"dit": "bench_dit", "unet": "bench_unet", "flow": "bench_flow"}
FILE_OF = {"vae": "vae.safetensors", "clip": "eval_clip.safetensors", "dit": "bench_dit.safetensors",
           "unet": "bench_unet.safetensors", "flow": "bench_flow.safetensors"}

# Training-loop minutes per stage add up to 11.5; with imports, data, export and the report an H100 run
# takes about 14 minutes in two invocations: vae + clip + dit, then unet + flow + report.
PLANS = {
    "full": {
        "vae": StagePlan(minutes=1.25, max_steps=10**9, batch_size=256, lr=1e-3, warmup=200),
        "clip": StagePlan(minutes=1.25, max_steps=10**9, batch_size=512, lr=1e-3, warmup=200),
        # Its loss turned NaN under bf16 autocast twice when extended at batch 1024 (H200): fp32 + TF32.
        "dit": StagePlan(minutes=3.0, max_steps=10**9, batch_size=512, lr=5e-4, warmup=500, bf16=False),
        "unet": StagePlan(minutes=3.0, max_steps=10**9, batch_size=512, lr=5e-4, warmup=500),
        # FluxTransformer2DModel's loss is NaN from the first 100 steps under bf16 autocast (H100): fp32 + TF32.
        "flow": StagePlan(minutes=3.0, max_steps=10**9, batch_size=512, lr=5e-4, warmup=500, bf16=False),
    },
    "tiny": {s: StagePlan(minutes=1.0, max_steps=3, batch_size=8, lr=1e-3, warmup=1, log_every=1, bf16=s != "flow")
             for s in ("vae", "clip", "dit", "unet", "flow")},   # flow fp32 too: bf16 grads not finite at step 2 (H200)
}
DATA = {
    "full": dict(images=150_000, negatives=3, report_prompts=200, retrieval_pairs=500, report_steps=None),
    "tiny": dict(images=48, negatives=2, report_prompts=4, retrieval_pairs=6, report_steps=2),
}
# Minutes a stage needs beyond its training loop (data, latents, export; the report: sampling), used to
# stop at a stage boundary rather than start a stage that cannot finish. --tiny does not plan ahead.
OVERHEAD = {"full": dict(vae=0.6, clip=0.3, dit=0.3, unet=0.3, flow=0.3, report=0.6), "tiny": None}
DATA_MINUTES = 0.5           # rendering + tokenising the training set, once per invocation (first stage)
MARGIN_MINUTES = 0.25        # kept free when deciding whether the next stage fits
RESERVE_S = {"full": 45.0, "tiny": 0.0}    # a stage cut short stops this early, for checkpoint, export and exit


def log(msg: str) -> None:
    print(f"[{(time.monotonic() - _T0) / 60:5.2f} min] {msg}", flush=True)


class Run:
    """Everything one invocation shares between stages: arguments, device, budget, data, report."""

    def __init__(self, args: argparse.Namespace, argv: list[str], start: float):
        self.args, self.mode = args, "tiny" if args.tiny else "full"
        self.sizes = configs.SIZES[self.mode]
        self.plans = dict(PLANS[self.mode])
        for item in args.stage_minutes:
            stage, minutes = item.split("=")
            self.plans[stage] = replace(self.plans[stage], minutes=float(minutes))
        for item in args.max_steps:
            stage, steps = item.split("=")
            self.plans[stage] = replace(self.plans[stage], max_steps=int(steps))
        for item in args.batch:
            stage, size = item.split("=")
            self.plans[stage] = replace(self.plans[stage], batch_size=int(size))
        for item in args.lr:
            stage, lr = item.split("=")
            self.plans[stage] = replace(self.plans[stage], lr=float(lr))
        self.data_plan = dict(DATA[self.mode])
        if args.images:
            self.data_plan["images"] = args.images
        if args.report_prompts:
            self.data_plan["report_prompts"] = args.report_prompts
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.budget = Budget(args.minutes, start)
        self.out, self.ckpt = Path(args.out), Path(args.ckpt)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.tokenizer = models.bench_tokenizer()
        self.report = json.loads((self.out / REPORT_FILE).read_text()) if (self.out / REPORT_FILE).is_file() else {}
        self.report.setdefault("stages", {})
        self.report.setdefault("invocations", [])
        self.invocation = {"command": " ".join(["python", "experiments/train_bench.py", *argv]), "mode": self.mode,
                           "device": (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                                      else platform.processor() or "cpu"),
                           "device_type": self.device.type, "torch": torch.__version__, "seed": args.seed, "stages": {}}
        self._data: TrainData | None = None
        # Stages checkpointed mid-way by an earlier invocation: {stage: {step, trained_minutes}}.
        state_file = self.ckpt / "state.json"
        partial = json.loads(state_file.read_text()).get("partial", {}) if state_file.is_file() else {}
        self.partial = {s: v for s, v in partial.items() if self.checkpoint(s).is_file()}
        self.extending = set()      # finished generator stages that this invocation trains further

    def extends(self, stage: str) -> bool:
        return stage in self.extending

    # -- bookkeeping --
    def done(self, stage: str) -> bool:
        if stage == "report":
            return "report" in self.report
        return stage in self.report["stages"] and (self.out / FILE_OF[stage]).is_file()

    def checkpoint(self, stage: str) -> Path:
        return self.ckpt / f"{stage}.pt"

    def save_state(self, note: str = "") -> None:
        """Append this invocation to train_report.json (in --out) and write state.json (in --ckpt)."""
        self.invocation.update(minutes=round(self.budget.used_minutes(), 3), note=note)
        invocations = self.report["invocations"] + [self.invocation]
        report = dict(self.report, invocations=invocations,
                      gpu_minutes_total=round(sum(i["minutes"] for i in invocations if i["device_type"] == "cuda"), 3))
        (self.out / REPORT_FILE).write_text(json.dumps(report, indent=1))
        state = {"done": [s for s in STAGES if self.done(s)], "partial": self.partial,
                 "invocations": len(invocations), "last_note": note}
        (self.ckpt / "state.json").write_text(json.dumps(state, indent=1))

    def remaining_minutes(self, stage: str) -> float:
        """Estimated minutes to finish `stage` (0 in --tiny mode, which runs by step count)."""
        if OVERHEAD[self.mode] is None:
            return 0.0
        if stage == "report":
            return OVERHEAD[self.mode]["report"]
        trained = self.partial.get(stage, {}).get("trained_minutes", 0.0)
        data = DATA_MINUTES if self._data is None else 0.0
        return max(self.plans[stage].minutes - trained, 0.0) + OVERHEAD[self.mode][stage] + data

    # -- data shared by the stages of this invocation --
    def data(self) -> TrainData:
        if self._data is None:
            d = self.data_plan
            self._data = prepare(d["images"], self.args.seed, d["negatives"], self.tokenizer, self.device, log=log)
        return self._data

    def stage_seed(self, stage: str) -> int:
        """Seed of the stage's init and data order; each --extend segment draws a fresh data order."""
        segments = len(self.report["stages"].get(stage, {}).get("segments", [])) if self.extends(stage) else 0
        return 1000 * self.args.seed + STAGES.index(stage) + 100 * segments

    def train(self, stage: str, modules: dict[str, torch.nn.Module], loss_fn) -> StageRun | None:
        """Run the stage's loop; the StageRun when the stage finished, None when it was cut short."""
        plan = self.plans[stage]
        run = StageRun(stage, modules, plan, self.device, self.stage_seed(stage), self.checkpoint(stage), log=log)
        log(f"[{stage}] {param_count(modules) / 1e6:.2f}M parameters, batch {plan.batch_size}, lr {plan.lr:g}, "
            f"{plan.minutes:g} training minutes")
        finished = run.run(loss_fn, self.budget, RESERVE_S[self.mode])
        self.partial[stage] = {"step": run.step, "trained_minutes": round(run.elapsed / 60, 3)}
        self.invocation["stages"][stage] = dict(self.partial[stage], finished=finished)
        return run if finished else None

    def record(self, stage: str, run: StageRun, modules: dict, size_bytes: int, **extra) -> None:
        before = self.report["stages"].get(stage, {}) if self.extends(stage) else {}
        steps0, minutes0 = before.get("steps", 0), before.get("train_minutes", 0.0)
        history = [(steps0 + step, loss) for step, loss in run.history[:: max(1, len(run.history) // 50)]
                   + run.history[-1:]]
        segment = {"steps": run.step, "train_minutes": round(run.elapsed / 60, 3), "plan": asdict(run.plan),
                   "stage_seed": self.stage_seed(stage), "start": "export" if before else "init",
                   "invocation": len(self.report["invocations"])}
        segments = before.get("segments") or ([{k: before[k] for k in ("steps", "train_minutes", "plan",
                                                                      "stage_seed")} | {"start": "init"}]
                                              if before else [])
        self.report["stages"][stage] = {
            "steps": steps0 + run.step, "train_minutes": round(minutes0 + run.elapsed / 60, 3),
            "plan": asdict(run.plan), "final_loss": run.history[-1][1] if run.history else None,
            "loss_history": before.get("loss_history", []) + history, "segments": segments + [segment],
            "parameters": param_count(modules), "file": FILE_OF[stage], "file_mb": round(size_bytes / 2**20, 3),
            "seed": self.args.seed, "stage_seed": self.stage_seed(stage), **extra,
        }
        run.discard_checkpoint()
        self.partial.pop(stage, None)
        self.report.pop("report", None)          # a new export makes the last report stale
        models.save_tokenizer(self.tokenizer, self.out)
        log(f"[{stage}] exported {self.out / FILE_OF[stage]} ({size_bytes / 2**20:.2f} MB)")


def seeded(run: Run, stage: str) -> None:
    torch.manual_seed(run.stage_seed(stage))     # module initialisation


# ---------------------------------------------------------------- stages

def stage_vae(run: Run) -> bool:
    data = run.data()
    seeded(run, "vae")
    spec = models.vae_spec(run.sizes)
    vae = models.build(spec).to(run.device)
    batch = run.plans["vae"].batch_size

    def loss_fn(gen):
        x = data.images[data.batch_index(batch, gen)].float() / 127.5 - 1
        return vae_loss(vae, x, gen)

    trained = run.train("vae", {"vae": vae}, loss_fn)
    if trained is None:
        return False
    vae = trained.ema_modules()["vae"].half().float()     # measure the latent scale on the shipped fp16 weights
    with torch.no_grad():
        sample = data.images[: min(len(data), 8192)].float() / 127.5 - 1
        means = torch.cat([vae.encode(sample[a:a + 1024]).latent_dist.mean for a in range(0, len(sample), 1024)])
        rec = vae.decode(means[:256]).sample
        psnr = (10 * torch.log10(4 / F.mse_loss(rec, sample[:256]))).item()
    scaling = float(1 / means.std())
    spec["kwargs"]["scaling_factor"] = scaling
    vae.register_to_config(scaling_factor=scaling)
    size = models.export(run.out / FILE_OF["vae"], {"vae": vae}, {"vae": spec})
    run.record("vae", trained, {"vae": vae}, size, scaling_factor=scaling, latent_mean=float(means.mean()),
               reconstruction_psnr_db=round(psnr, 2))
    log(f"[vae] scaling factor {scaling:.4f}, reconstruction PSNR {psnr:.1f} dB")
    return True


def stage_clip(run: Run) -> bool:
    from qdrift.bench.evalclip import MEAN, STD
    data = run.data()
    seeded(run, "clip")
    spec = models.spec("CLIP", configs.eval_clip_config(run.sizes["eval_clip"], len(run.tokenizer)))
    clip = models.build(spec).to(run.device)
    batch = run.plans["clip"].batch_size
    mean = torch.tensor(MEAN, device=run.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=run.device).view(1, 3, 1, 1)

    def loss_fn(gen):
        idx = data.batch_index(batch, gen)
        x = data.images[idx].float() / 255
        # Robustness to generated images: mild noise, and a 2x blur on a third of the batch.
        blur = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
        pick = (torch.rand(batch, 1, 1, 1, generator=gen, device=x.device) < 0.33)
        x = torch.where(pick, blur, x)
        noise_level = 0.05 * torch.rand(batch, 1, 1, 1, generator=gen, device=x.device)
        x = x + noise_level * torch.randn(x.shape, generator=gen, device=x.device)
        return clip_loss(clip, (x - mean) / std, data.ids[idx], data.neg_ids[idx])

    trained = run.train("clip", {"clip": clip}, loss_fn)
    if trained is None:
        return False
    clip = trained.ema_modules()["clip"]
    size = models.export(run.out / FILE_OF["clip"], {"clip": clip}, {"clip": spec},
                         extra={"image_size": configs.RESOLUTION, "mean": MEAN, "std": STD})
    run.record("clip", trained, {"clip": clip}, size)
    return True


def stage_generator(run: Run, stage: str) -> bool:
    name = GENERATOR_OF[stage]
    if not run.done("vae"):
        raise SystemExit(f"stage {stage} needs the VAE: run --stage vae first (no {run.out / FILE_OF['vae']})")
    data = run.data()
    if data.latents is None:
        vae = models.load_modules(run.out / FILE_OF["vae"])[0]["vae"].to(run.device)
        data.latents = encode_latents(data, vae, vae.config.scaling_factor)
        log(f"[latents] {tuple(data.latents.shape)} encoded with the exported VAE, std {data.latents.std():.3f}")
    seeded(run, stage)
    specs = models.generator_specs(name, run.sizes)
    if run.extends(stage):
        modules, _ = models.load_modules(run.out / FILE_OF[stage])
        modules = {slot: m.float().requires_grad_(True).to(run.device) for slot, m in modules.items()}
        log(f"[{stage}] extending from {run.out / FILE_OF[stage]} "
            f"({run.report['stages'][stage]['steps']} steps so far)")
    else:
        modules = {slot: models.build(s).to(run.device) for slot, s in specs.items()}
    denoiser_slot = configs.DENOISER[name]
    encoders = {k: m for k, m in modules.items() if k != denoiser_slot}
    objective = DenoisingLoss(name, run.device)
    batch = run.plans[stage].batch_size

    def loss_fn(gen):
        idx = data.batch_index(batch, gen)
        ids, mask = drop_captions(data.ids[idx], data.mask[idx], data.empty_ids, data.empty_mask, gen)
        return objective(modules[denoiser_slot], encoders, data.latents[idx], ids, mask, gen)

    trained = run.train(stage, modules, loss_fn)
    if trained is None:
        return False
    modules = trained.ema_modules()
    size = models.export(run.out / FILE_OF[stage], modules, specs,
                         extra={"scheduler": models.scheduler_spec(name), "max_tokens": run.tokenizer.model_max_length})
    run.record(stage, trained, modules, size, pipeline=configs.PIPELINE[name], sampling=configs.SAMPLING[name])
    return True


def stage_report(run: Run) -> bool:
    from qdrift.bench.dataset import captions, reference_images
    from qdrift.bench.evalclip import (
        attribute_accuracy,
        load_eval_clip,
        retrieval_accuracy,
    )
    d, dev = run.data_plan, str(run.device)
    missing = [s for s in ("vae", "clip") if not run.done(s)]
    if missing:
        raise SystemExit(f"the report needs stages {missing} exported in {run.out}")
    clip = load_eval_clip(dev, weights_dir=run.out)
    prompts = captions("eval", d["report_prompts"])
    refs = reference_images(prompts, device=dev)
    pairs = captions("eval", d["retrieval_pairs"])
    result = {
        "prompts": len(prompts), "prompt_split": "eval", "noise_seed": 0,
        "reference_attribute_accuracy": attribute_accuracy(refs, prompts, clip),
        "clip_retrieval_accuracy": retrieval_accuracy(reference_images(pairs, device=dev), pairs, clip),
        "clip_retrieval_pairs": len(pairs), "generators": {},
    }
    grid = [refs[:8].cpu()]
    for stage, name in GENERATOR_OF.items():
        if not run.done(stage):
            log(f"[report] {name} not trained yet: skipped")
            continue
        pipe = models.load_bench_pipeline(name, device=dev, weights_dir=run.out)
        t0 = time.monotonic()
        fp = models.generate(pipe, name, prompts, seed=0, batch_size=50, steps=d["report_steps"])
        seconds = time.monotonic() - t0
        models.reinit_denoiser(pipe, seed=0)
        rnd = models.generate(pipe, name, prompts, seed=0, batch_size=50, steps=d["report_steps"])
        result["generators"][name] = {
            "sampler": configs.SCHEDULERS[name][0], **configs.SAMPLING[name],
            "fp_attribute_accuracy": attribute_accuracy(fp, prompts, clip),
            "random_weights_attribute_accuracy": attribute_accuracy(rnd, prompts, clip),
            "sampling_seconds": round(seconds, 2),
        }
        grid.append(fp[:8])
        g = result["generators"][name]
        log(f"[report] {name}: attribute accuracy FP {g['fp_attribute_accuracy']['mean']:.3f} "
            f"vs random weights {g['random_weights_attribute_accuracy']['mean']:.3f}")
    log(f"[report] references {result['reference_attribute_accuracy']['mean']:.3f}, "
        f"CLIP retrieval top-1 {result['clip_retrieval_accuracy']:.3f} of {len(pairs)}")
    run.report["report"] = result
    torch.save({"captions": prompts[:8], "rows": ["reference", *result["generators"]], "images": torch.stack(grid)},
               run.ckpt / "samples.pt")
    _save_grid(torch.stack(grid), run.ckpt / "samples.png")
    return True


def _save_grid(images: torch.Tensor, path: Path) -> None:
    """Rows x 8 grid as PNG, if Pillow is around (it comes with diffusers)."""
    try:
        from PIL import Image
    except ImportError:
        return
    rows, cols = images.shape[:2]
    grid = images.permute(0, 3, 1, 4, 2).reshape(rows * 64, cols * 64, 3)
    pixels = (grid.clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(pixels).resize((cols * 128, rows * 128), Image.NEAREST).save(path)


RUNNERS = {"vae": stage_vae, "clip": stage_clip, "dit": lambda r: stage_generator(r, "dit"),
           "unet": lambda r: stage_generator(r, "unet"), "flow": lambda r: stage_generator(r, "flow"),
           "report": stage_report}


def merge(out: Path, parts: list[Path]) -> list[str]:
    """Bring the stages trained in copies of `out` (run side by side) back into `out`, with every invocation
    of each copy, failed ones included."""
    missing = [str(d / REPORT_FILE) for d in (out, *parts) if not (d / REPORT_FILE).is_file()]
    if missing:
        raise SystemExit(f"--merge needs a training report in --out and in every part; missing: {missing}")
    base = json.loads((out / REPORT_FILE).read_text())
    merged, taken, files = dict(base, stages=dict(base["stages"])), [], []
    for part in parts:
        report = json.loads((part / REPORT_FILE).read_text())
        if report["invocations"][: len(base["invocations"])] != base["invocations"]:
            raise SystemExit(f"{part} was not copied from {out}: its earlier invocations differ")
        new = report["invocations"][len(base["invocations"]):]
        stages = [s for s in FILE_OF if report["stages"].get(s) != base["stages"].get(s)]
        if not new:
            raise SystemExit(f"{part}: no invocation since it was copied from {out}")
        for stage in stages:
            if stage in taken:
                raise SystemExit(f"stage {stage} was trained in more than one of {parts}")
            entry = report["stages"][stage]
            for segment in entry.get("segments", [])[-1:]:      # the part's last invocation finished it
                segment["invocation"] = len(merged["invocations"]) + len(new) - 1
            merged["stages"][stage] = entry
            taken.append(stage)
            files.append((part / FILE_OF[stage], out / FILE_OF[stage]))
        merged["invocations"] = merged["invocations"] + new
    for src, dst in files:          # only once every part checked out
        shutil.copyfile(src, dst)
    merged.pop("report", None)
    merged["gpu_minutes_total"] = round(sum(i["minutes"] for i in merged["invocations"] if i["device_type"] == "cuda"), 3)
    (out / REPORT_FILE).write_text(json.dumps(merged, indent=1))
    return taken


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=STAGES + ("all",), default="all")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this invocation (from start)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "qdrift" / "bench" / "weights"))
    p.add_argument("--ckpt", default="outputs/bench_ckpt", help="checkpoints and state.json (resume from here)")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="copies of --out trained side by side: merge their stages into --out, then stop")
    p.add_argument("--tiny", action="store_true", help="tiny models, a few steps: a CPU smoke run in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--redo", action="store_true", help="retrain the named stage even if its export exists")
    p.add_argument("--extend", action="store_true",
                   help="train the named (finished) generator stage further, from its export")
    p.add_argument("--stage-minutes", nargs="*", default=[], metavar="STAGE=MIN", help="override training minutes")
    p.add_argument("--max-steps", nargs="*", default=[], metavar="STAGE=N", help="cap steps (exact reproduction)")
    p.add_argument("--batch", nargs="*", default=[], metavar="STAGE=N", help="override batch sizes")
    p.add_argument("--lr", nargs="*", default=[], metavar="STAGE=LR", help="override learning rates")
    p.add_argument("--images", type=int, default=None, help="override the number of training images")
    p.add_argument("--report-prompts", type=int, default=None, help="override the report's prompt count")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # From the command line the budget counts from process start (imports included); called in-process, from now.
    start = _T0 if argv is None else time.monotonic()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.merge:
        log(f"merged stages {merge(Path(args.out), [Path(d) for d in args.merge])} into {args.out}")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed)
    if args.tiny and not torch.cuda.is_available():
        torch.set_num_threads(1)      # tiny tensors: more CPU threads only add synchronisation
    run = Run(args, argv, start)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    if args.redo and args.stage != "all":
        run.report["stages"].pop(args.stage, None)
    if args.extend:
        if args.stage not in GENERATOR_OF or args.redo:
            raise SystemExit(f"--extend takes one generator stage ({', '.join(GENERATOR_OF)}), without --redo")
        if not run.done(args.stage):
            raise SystemExit(f"--extend {args.stage}: nothing to extend, no {run.out / FILE_OF[args.stage]}")
        run.extending.add(args.stage)
    log(f"device {run.device} ({run.invocation['device']}), mode {run.mode}, stages {stages}, "
        f"budget {args.minutes:g} min")
    note, ran = "complete", False
    try:
        for stage in stages:
            if run.done(stage) and not (stage == "report" and args.stage == "report") and not run.extends(stage):
                log(f"[{stage}] done already ({run.out}); --redo retrains it")
                continue
            need = run.remaining_minutes(stage)
            if ran and run.budget.left() / 60 < need + MARGIN_MINUTES:
                note = (f"stopped before {stage} (needs ~{need:.1f} min, {run.budget.left() / 60:.1f} left): "
                        "rerun to continue")
                log(note)
                break
            ran = True
            try:
                finished = RUNNERS[stage](run)
            except Exception as err:                 # recorded, then raised
                note = f"{stage} failed: {type(err).__name__}: {err}"
                raise
            if not finished:
                note = f"{stage} checkpointed mid-way: rerun with the same --ckpt to continue"
                break
        else:
            remaining = [s for s in STAGES if not run.done(s)]
            note = "complete" if not remaining else f"remaining stages: {remaining}"
    finally:
        run.save_state(note)
    log(f"{note}; this invocation {run.budget.used_minutes():.2f} min, report in {run.out / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
