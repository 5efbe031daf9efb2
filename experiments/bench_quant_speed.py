"""Step time and peak memory of the fake-quant twins of a PixArt-Sigma-XL-sized transformer.

    python experiments/bench_quant_speed.py --out outputs/bench_quant_speed.json          # one GPU
    python experiments/bench_quant_speed.py --tiny --out /tmp/bench.json                  # CPU smoke test

Builds `PixArtTransformer2DModel` with PixArt-Sigma-XL-2-1024-MS's architecture (28 layers,
16 heads x 72 = 1152 hidden, patch 2, T5 caption 4096 channels) and random FP16 weights, then
times one denoiser forward at 1024x1024 (128x128 latents, batch 2 for CFG, 300 text tokens):
FP16 and each method's fake-quant twin (median of --iters CUDA-synchronised runs after warm-up),
each both eager and replayed as a CUDA graph (--cuda-graph; `qdrift.models.cuda_graph`), which
removes the Python launch overhead that makes the eager fake-quant step host-bound.
Calibration feeds random latents straight to the denoiser (at --calib-latent to keep MixDQ's
per-layer sensitivity sweep short): only speed is measured here, not quality.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import PixArtTransformer2DModel
from omegaconf import OmegaConf

from qdrift.models.cuda_graph import eager_forward, use_cuda_graphs
from qdrift.quant import QuantSpec, dequantize, quantize
from qdrift.quant.calib import replay_calibrator

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("svdquant_w4a4", "svdquant_w3a4", "svdquant_nvfp4", "mixdq_w4a8", "mixdq_w8a8", "rtn_w8a8")

# PixArt-Sigma-XL-2-1024-MS transformer/config.json
PIXART_SIGMA_XL = dict(
    sample_size=128, num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
    patch_size=2, caption_channels=4096, cross_attention_dim=1152, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False,
)
TINY = dict(PIXART_SIGMA_XL, sample_size=8, num_layers=1, num_attention_heads=2, attention_head_dim=32,
            caption_channels=64, cross_attention_dim=64, interpolation_scale=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--out", type=Path, required=True, help="JSON results path")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--iters", type=int, default=10, help="timed forwards per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--latent", type=int, default=None, help="latent side (default 128 = 1024 px; tiny 16)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default 300; tiny 16)")
    p.add_argument("--calib-latent", type=int, default=None, help="latent side of calibration inputs (default 64)")
    p.add_argument("--calib-calls", type=int, default=2, help="random denoiser calls per calibration run")
    p.add_argument("--calib-tokens", type=int, default=None, help="SVDQuant per-layer token sample (1024; tiny 128)")
    p.add_argument("--lowrank-iters", type=int, default=3, help="SVDQuant low-rank refinement iterations")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per variant")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each variant replayed as a CUDA graph (GPU only)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def denoiser_inputs(cfg: dict, batch: int, latent: int, text_len: int, device, dtype, gen: torch.Generator) -> dict:
    return dict(
        hidden_states=torch.randn(batch, cfg["in_channels"], latent, latent, generator=gen).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text_len, cfg["caption_channels"], generator=gen).to(device, dtype),
        timestep=torch.randint(0, 1000, (batch,), generator=gen).to(device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def spec_for(option: str, args: argparse.Namespace) -> QuantSpec:
    # Next to PixArt's model config, as in a real run, so interpolations (the SVDQuant rank) resolve.
    conf = OmegaConf.create({"model": OmegaConf.load(ROOT / "conf" / "model" / "pixart.yaml"),
                             "quant": OmegaConf.load(ROOT / "conf" / "quant" / f"{option}.yaml")})
    cfg = OmegaConf.to_container(conf.quant, resolve=True)
    cfg["calib_prompts"] = args.calib_calls
    if cfg["method"] == "svdquant":
        cfg.update(calib_tokens=args.calib_tokens or (128 if args.tiny else 1024), lowrank_iters=args.lowrank_iters)
    if cfg["method"] == "mixdq":
        cfg["sensitivity_prompts"] = 1
    return QuantSpec.from_config(cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def profile_step(model, inputs: dict, device) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        model(**inputs)
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=50), flush=True)


@torch.inference_mode()   # as in a run (sampling.py); no_grad adds autograd bookkeeping per op
def time_forward(model, inputs: dict, args, device, profile: bool = False) -> dict:
    """Median step time of a second timing round after warm-up; the first round is reported too, so
    drift within a run (late JIT compilation, allocator growth, clocks) shows up in the results."""
    for _ in range(args.warmup):
        model(**inputs)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds = []
    for _ in range(2):
        times = []
        for _ in range(args.iters):
            sync(device)
            t = time.perf_counter()
            out = model(**inputs)[0]
            sync(device)
            times.append(time.perf_counter() - t)
        rounds.append(1000 * statistics.median(times))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if profile:
        profile_step(model, inputs, device)
    return dict(step_ms=rounds[-1], first_round_ms=rounds[0], peak_gib=peak, out=out.float())


def time_variant(model, inputs: dict, args, device) -> dict:
    """Eager timing, plus the same step replayed as a CUDA graph (its output must match eager)."""
    r = time_forward(model, inputs, args, device, profile=args.profile)
    if args.cuda_graph and device.type == "cuda":
        use_cuda_graphs(model)
        g = time_forward(model, inputs, args, device)   # the profile is of the eager step
        eager_forward(model)
        r.update(graph_ms=g["step_ms"], graph_peak_gib=g["peak_gib"],
                 graph_max_abs_diff=(g["out"] - r["out"]).abs().max().item())
        torch.cuda.empty_cache()
    return r


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    cfg = TINY if args.tiny else PIXART_SIGMA_XL
    latent = args.latent or (8 if args.tiny else 128)
    text_len = args.text_len or (16 if args.tiny else 300)
    calib_latent = args.calib_latent or (8 if args.tiny else 64)
    torch.manual_seed(args.seed)
    model = PixArtTransformer2DModel(**cfg).to(device, dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(args.seed)
    inputs = denoiser_inputs(cfg, 2, latent, text_len, device, dtype, gen)
    calls = [((), denoiser_inputs(cfg, 2, calib_latent, text_len, device, dtype, gen)) for _ in range(args.calib_calls)]
    calibrate = replay_calibrator(model, calls)

    fp = time_variant(model, inputs, args, device)
    graph_cols = ("graph_ms", "graph_peak_gib", "graph_max_abs_diff")
    rows = [dict(variant="fp16" if dtype == torch.float16 else "fp32", step_ms=fp["step_ms"],
                 first_round_ms=fp["first_round_ms"], peak_gib=fp["peak_gib"],
                 ratio=1.0, rel_err=0.0, quantize_s=0.0, **{k: fp[k] for k in graph_cols if k in fp})]
    if "graph_ms" in fp:
        rows[0]["graph_ratio"] = 1.0
        print(f"fp: {fp['step_ms']:.1f} ms eager, {fp['graph_ms']:.1f} ms CUDA graph", flush=True)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{n_params / 1e6:.0f}M parameters, latents {latent}x{latent}, batch 2, text {text_len}", flush=True)
    for option in args.methods:
        spec = spec_for(option, args)
        sync(device)
        t = time.perf_counter()
        report = quantize(model, spec, "pixart", calibrate, progress=not args.tiny)
        sync(device)
        q_s = time.perf_counter() - t
        r = time_variant(model, inputs, args, device)
        err = ((r["out"] - fp["out"]).pow(2).sum() / fp["out"].pow(2).sum()).item()
        rows.append(dict(variant=option, step_ms=r["step_ms"], first_round_ms=r["first_round_ms"], peak_gib=r["peak_gib"],
                         ratio=r["step_ms"] / fp["step_ms"],
                         rel_err=err, quantize_s=q_s, avg_w_bits=report.avg_w_bits, avg_a_bits=report.avg_a_bits,
                         packed_mb=report.packed_mb, **{k: r[k] for k in graph_cols if k in r}))
        if "graph_ms" in r:
            rows[-1]["graph_ratio"] = r["graph_ms"] / fp["graph_ms"]
        graphed = f"; CUDA graph {r['graph_ms']:.1f} ms ({rows[-1]['graph_ratio']:.2f}x)" if "graph_ms" in r else ""
        print(f"{option}: {r['step_ms']:.1f} ms ({rows[-1]['ratio']:.2f}x; first round {r['first_round_ms']:.1f} ms"
              f"{graphed}), quantized in {q_s:.0f}s", flush=True)
        dequantize(model)
        del r
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("\n| variant | eager step (ms) | x FP | CUDA-graph step (ms) | x FP (graph) | peak GPU mem (GiB) "
          "| rel. output error | quantize (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        graph = f"{r['graph_ms']:.1f} | {r['graph_ratio']:.2f}" if "graph_ms" in r else "- | -"
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['ratio']:.2f} | {graph} | {r['peak_gib']:.2f} "
              f"| {r['rel_err']:.2e} | {r['quantize_s']:.0f} |")
    result = dict(device=str(device), gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  torch=torch.__version__, params=n_params, latent=latent, batch=2, text_len=text_len,
                  dtype=str(dtype), iters=args.iters, rows=rows, args={k: str(v) for k, v in vars(args).items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
