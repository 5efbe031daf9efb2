"""The runner end to end on tiny random pipelines: artifacts, caching, resume, sweeps over K, logging."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qdrift.stages import calibrate as calibrate_mod
from qdrift.stages import generate as generate_mod
from qdrift.stages import sampling

ROOT = Path(__file__).resolve().parents[1]


class CallCounter:
    """Counts pipeline calls (by purpose) while delegating to the real one."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = sampling.call_pipeline

        def counted(ctx, prompts, seeds, scheduler, output_type="pt"):
            self.calls.append((output_type, list(seeds)))
            return real(ctx, prompts, seeds, scheduler, output_type)

        for mod in (sampling, generate_mod, calibrate_mod):
            monkeypatch.setattr(mod, "call_pipeline", counted)
        from qdrift.stages import quantize as quantize_mod

        monkeypatch.setattr(quantize_mod, "call_pipeline", counted)

    def images(self):
        return [c for c in self.calls if c[0] == "pt"]


def test_tiny_run_without_quantization_or_correction(run_tiny):
    metrics, run_dir = run_tiny(["quant=none", "corrector=none"])
    assert set(metrics["variants"]) == {"fp", "quant"}
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk["variants"] == metrics["variants"]
    assert set(on_disk) >= {"variants", "config", "timing"}
    # quant=none: the "quant" images are the FP batches (one cache key), so only FP is timed
    assert set(on_disk["timing"]) == {"build", "quantize", "generate", "evaluate", "s_per_image/fp"}
    for variant in ("fp", "quant"):
        assert sorted(p.name for p in (run_dir / "images" / variant).glob("*.png")) == [f"{i}.png" for i in range(4)]
    # quant=none: the "quantized" images are the FP images (same cache entry, no second generation).
    assert metrics["variants"]["quant"]["psnr_vs_fp"] == pytest.approx(100.0, abs=100)
    assert (run_dir / "images/fp/0.png").read_bytes() == (run_dir / "images/quant/0.png").read_bytes()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "config.json").is_file()


def test_quantized_and_corrected_run_writes_statistics(run_tiny):
    metrics, run_dir = run_tiny(["quant=rtn_w4a8", "++quant.calib_prompts=2", "corrector=all"])
    assert set(metrics["variants"]) == {"fp", "quant", "qdrift", "qdrift_exact", "qdrift_plus", "ptqd", "d2dpm",
                                        "d2dpm_stochastic", "cumcomp"}
    assert (run_dir / "stats/pool.safetensors").is_file()
    summary = json.loads((run_dir / "stats/summary.json").read_text())
    assert summary["num_runs"] == 2 and len(summary["residual_var_scalar"]) == 4
    assert all(v[0] > 0 for v in summary["residual_var_scalar"])  # RTN W4A8 really perturbs the outputs
    assert metrics["variants"]["quant"]["psnr_vs_fp"] < 60


def test_second_identical_run_is_served_from_cache(run_tiny, monkeypatch):
    first, _ = run_tiny(["quant=rtn_w4a8", "++quant.calib_prompts=2"])
    counter = CallCounter(monkeypatch)
    second, _ = run_tiny(["quant=rtn_w4a8", "++quant.calib_prompts=2"])
    assert counter.calls == []  # no quantizer calibration, no Q-Drift calibration, no images
    assert second["variants"] == first["variants"]


def test_resume_after_crash_gives_identical_metrics(run_tiny, tmp_path, monkeypatch):
    overrides = ["quant=rtn_w4a8", "++quant.calib_prompts=2", "eval.num_prompts=6", "batch_size=2", "corrector=qdrift"]
    reference, ref_dir = run_tiny(overrides, cache=tmp_path / "cache_ref")

    saved = {"n": 0}
    real_save = generate_mod.atomic_save_image

    def crashing_save(img, path):
        if saved["n"] == 7:  # mid-way through the second variant's first batch
            raise KeyboardInterrupt("simulated kill")
        saved["n"] += 1
        real_save(img, path)

    monkeypatch.setattr(generate_mod, "atomic_save_image", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(overrides, cache=tmp_path / "cache_crash")
    monkeypatch.setattr(generate_mod, "atomic_save_image", real_save)
    images = sorted((tmp_path / "cache_crash" / "images").rglob("*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in images}
    assert len(images) == 6  # three whole batches of FP images; the half-made batch left nothing behind

    counter = CallCounter(monkeypatch)
    resumed, run_dir = run_tiny(overrides, cache=tmp_path / "cache_crash")
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # finished images were not rewritten
    generated = sum(len(seeds) for _, seeds in counter.images())
    assert generated == 3 * 6 - 6  # the 3 finished batches of 2 images were skipped
    assert resumed["variants"] == reference["variants"]
    for variant in ("fp", "quant", "qdrift"):
        for i in range(6):
            assert (run_dir / f"images/{variant}/{i}.png").read_bytes() == \
                (ref_dir / f"images/{variant}/{i}.png").read_bytes()


def test_sweep_over_k_reuses_pool_and_images(run_tiny, monkeypatch):
    base = ["quant=rtn_w4a8", "++quant.calib_prompts=2", "calib.batch_size=2", "corrector=qdrift"]
    run_tiny([*base, "calib.num_runs=2"])
    counter = CallCounter(monkeypatch)
    metrics, run_dir = run_tiny([*base, "calib.num_runs=3"])
    latent_calls = [seeds for kind, seeds in counter.calls if kind == "latent"]
    # only the new block of runs (2, 3): FP pass + teacher-forced quantized pass
    assert latent_calls == [[1000002, 1000003], [1000002, 1000003]]
    image_calls = counter.images()
    assert len(image_calls) == 1  # only the corrected variant (new K) is generated; FP and quant come from cache
    summary = json.loads((run_dir / "stats/summary.json").read_text())
    assert summary["num_runs"] == 3 and summary["pool_runs"] == 4


def test_wandb_offline_logs_and_failures_do_not_kill_the_run(run_tiny, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    _, run_dir = run_tiny(["quant=none", "corrector=none", "logger=wandb", "logger.mode=offline"])
    assert list((run_dir / "wandb").glob("offline-run-*")), "an offline W&B run was written"

    import wandb

    def broken_init(*a, **k):
        raise RuntimeError("W&B is down")

    monkeypatch.setattr(wandb, "init", broken_init)
    metrics, _ = run_tiny(["quant=none", "corrector=none", "logger=wandb", "logger.mode=offline"])
    assert "fp" in metrics["variants"]


def test_command_line_prints_run_dir_last(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    args = [sys.executable, "run.py", "model=tiny_pixart", "eval=smoke", "eval.num_prompts=2", "batch_size=2",
            "sampler.steps=2", "quant=none", "corrector=none", "logger=none", f"output_root={tmp_path}"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-1]
    assert Path(last).is_dir() and (Path(last) / "metrics.json").is_file()

    bad = subprocess.run([*args[:2], "calib.num_runs=0", f"output_root={tmp_path}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "error: calib.num_runs (K) must be an integer >= 1" in bad.stderr


@pytest.mark.parametrize("model,sampler", [
    ("tiny_flux", "flow_euler"), ("tiny_flux", "dpmpp"), ("tiny_sana", "dpmpp"), ("tiny_sana", "flow_euler"),
    ("tiny_sdxl", "euler_a"), ("tiny_sd", "ddim"), ("tiny_sdxl", "euler"),
])
def test_every_family_runs_quantized_and_corrected(run_tiny, model, sampler):
    """The same runner path for every pipeline family and sampler: PTQ, paired calibration, correction."""
    metrics, run_dir = run_tiny([f"model={model}", f"sampler={sampler}", "quant=rtn_w8a8", "++quant.calib_prompts=1",
                                 "eval.num_prompts=2", "batch_size=2", "corrector=[qdrift,qdrift_exact]"])
    assert set(metrics["variants"]) == {"fp", "quant", "qdrift", "qdrift_exact"}
    summary = json.loads((run_dir / "stats/summary.json").read_text())
    assert len(summary["residual_var_channel"][0]) == 4  # latent channels (FLUX's packed features mapped back)
    assert max(v[0] for v in summary["residual_var_scalar"]) > 0


def test_multirun_sweep_over_k(tmp_path):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    args = [sys.executable, "run.py", "-m", "model=tiny_pixart", "eval=smoke", "eval.num_prompts=2", "batch_size=2",
            "sampler.steps=2", "quant=rtn_w8a8", "++quant.calib_prompts=1", "logger=none", f"output_root={tmp_path}",
            "calib.num_runs=1,2"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = sorted(tmp_path.glob("multirun/*/*/*/metrics.json"))
    assert len(metrics) == 2
    ks = sorted(json.loads(m.read_text())["config"]["calib"]["num_runs"] for m in metrics)
    assert ks == [1, 2]
    # One block of calibration runs (calib.batch_size = batch_size = 2) serves both jobs.
    pools = list((tmp_path / "cache" / "calib").glob("*/pool.safetensors"))
    assert len(pools) == 1


def test_embedded_default_end_to_end_on_few_prompts(tmp_path):
    """`make run` (= `python run.py`, no overrides) on the shipped bench model, with fewer prompts and a
    lighter SVDQuant search: every stage runs for real and prints the table and the run dir."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [sys.executable, "run.py", "eval.num_prompts=16", "quant.calib_prompts=8", "quant.calib_tokens=512",
            "quant.lowrank_iters=5", "logger=none", f"output_root={tmp_path}"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    run_dir = Path(lines[-1])
    assert run_dir.is_dir() and run_dir.parent.parent == tmp_path / "runs"
    assert any(line.startswith("qdrift ") for line in lines) and any("FID" in line for line in lines)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cfg = metrics["config"]
    assert (cfg["model"]["name"], cfg["quant"]["name"], cfg["quant"]["rank"], cfg["calib"]["num_runs"]) == \
        ("bench_dit", "svdquant_w3a4", 4, 5)
    assert set(metrics["variants"]) == {"fp", "quant", "qdrift", "qdrift_plus"}   # corrector=default
    for variant in ("fp", "quant", "qdrift", "qdrift_plus"):
        assert len(list((run_dir / "images" / variant).glob("*.png"))) == 16
    quant = metrics["variants"]["quant"]
    assert quant["psnr_vs_fp"] < 40 and quant["fid_vs_fp"] > 0       # really quantized: images differ from FP
    assert "fid_delta_ci_low" in metrics["variants"]["qdrift"]


def test_calibration_trims_at_the_configured_threshold(run_tiny):
    """The calibrate stage passes calib.trim_std to the moments: a tight threshold drops samples, 0 keeps all."""
    from qdrift.drift import CalibrationPool, moments

    counts = {}
    for trim in (0.0, 1.0):
        _, run_dir = run_tiny([*["quant=rtn_w4a8", "++quant.calib_prompts=2"], f"calib.trim_std={trim}"])
        pool = CalibrationPool.load(run_dir / "stats/pool.safetensors")
        counts[trim] = pool.scalar[..., moments.N]
    full = counts[0.0]
    assert bool((full == full.flatten()[0]).all())           # every element of every run and step kept
    assert bool((counts[1.0] < 0.8 * full).all())            # |z| <= 1 keeps about 68 %
