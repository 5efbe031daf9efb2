"""Whole runs on one shared cache: whatever ran before, a run's images and metrics equal the same
command's on an empty cache, byte for byte; damaged files are recomputed; parallel runs share work."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qdrift.config import ConfigError
from qdrift.models import loaders
from qdrift.stages import quantize as quantize_mod

from .test_runner import CallCounter

ROOT = Path(__file__).resolve().parents[1]
QUANT = ["quant=rtn_w4a8", "++quant.calib_prompts=2"]


def pngs(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / "images").rglob("*.png"))}


def assert_same_run(a, b):
    (ma, da), (mb, db) = a, b
    assert ma["variants"] == mb["variants"]
    assert pngs(da) == pngs(db)


def fake_mjhq(root: Path, n: int = 12) -> Path:
    from qdrift.prompts import BuiltinPrompts

    prompts = BuiltinPrompts().all[:n]
    meta = {}
    for i, p in enumerate(prompts):
        key = f"{i:04d}"
        meta[key] = {"prompt": p, "category": "things"}
        (root / "things").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), ((37 * i) % 255, 90, 200)).save(root / "things" / f"{key}.jpg")
    (root / "meta_data.json").write_text(json.dumps(meta))
    return root


MJHQ_EVAL = ["eval=mjhq", "eval.features=pixels", "eval.clip=none", "eval.kid_subset_size=2",
             "eval.num_resamples=20", "eval.eval_split=8"]


def test_mjhq_prompt_count_keeps_image_i(run_tiny, tmp_path):
    """MJHQ's evaluation split is fixed: more evaluation prompts add images and change nothing else
    (the calibration prompts, hence the quantized model, stay), on a shared or an empty cache."""
    mjhq = [*MJHQ_EVAL, f"eval.mjhq_dir={fake_mjhq(tmp_path / 'mjhq')}", *QUANT, "batch_size=2"]
    _, four = run_tiny([*mjhq, "eval.num_prompts=4"], cache=tmp_path / "shared")
    after = run_tiny([*mjhq, "eval.num_prompts=6"], cache=tmp_path / "shared")
    assert_same_run(after, run_tiny([*mjhq, "eval.num_prompts=6"], cache=tmp_path / "empty"))
    six = pngs(after[1])
    assert all(six[name] == data for name, data in pngs(four).items())


def test_changed_reference_files_are_read_again(run_tiny, tmp_path):
    """References copied from a directory are keyed by the files' bytes, not by their path."""
    root = fake_mjhq(tmp_path / "mjhq")
    mjhq = [*MJHQ_EVAL, f"eval.mjhq_dir={root}", "eval.num_prompts=4", "quant=none", "corrector=none"]
    run_tiny(mjhq, cache=tmp_path / "shared")
    Image.new("RGB", (40, 40), (250, 10, 10)).save(root / "things" / "0000.jpg")
    after = run_tiny(mjhq, cache=tmp_path / "shared")
    fresh = run_tiny(mjhq, cache=tmp_path / "empty")
    assert_same_run(after, fresh)
    assert (after[1] / "references/0.png").read_bytes() == (fresh[1] / "references/0.png").read_bytes()


def test_other_weights_never_reuse_artifacts(run_tiny, tmp_path, monkeypatch):
    run_tiny(QUANT, cache=tmp_path / "shared")
    real = loaders.build_tiny
    monkeypatch.setattr(loaders, "build_tiny", lambda family: real(family, seed=1))
    counter = CallCounter(monkeypatch)
    after = run_tiny(QUANT, cache=tmp_path / "shared")
    assert counter.images(), "other weights: the images were made again"
    assert_same_run(after, run_tiny(QUANT, cache=tmp_path / "empty"))


def test_a_new_quantizer_version_recomputes(run_tiny, tmp_path, monkeypatch):
    run_tiny(QUANT, cache=tmp_path / "shared")
    real = quantize_mod.algorithm_version
    monkeypatch.setattr(quantize_mod, "algorithm_version", lambda spec: real(spec) + "+changed")
    counter = CallCounter(monkeypatch)
    run_tiny(QUANT, cache=tmp_path / "shared")
    assert [c for c in counter.calls if c[0] == "pt"], "the quantizer ran again and so did everything below it"


def test_k_sweep_equals_fresh_runs(run_tiny, tmp_path):
    """Built 1 + 1 or fresh, run k of the pool is the same: a K sweep equals fresh runs byte for byte."""
    base = [*QUANT, "calib.batch_size=1"]
    swept = [run_tiny([*base, f"calib.num_runs={k}"], cache=tmp_path / "sweep") for k in (1, 2)]
    for k, run in zip((1, 2), swept):
        assert_same_run(run, run_tiny([*base, f"calib.num_runs={k}"], cache=tmp_path / f"fresh{k}"))
    stats = [json.loads((d / "stats/summary.json").read_text()) for _, d in swept]
    assert stats[0]["residual_var_scalar"] != stats[1]["residual_var_scalar"]   # K really changed the fit


def test_zero_drift_scale_gives_the_quantized_images(run_tiny, tmp_path):
    """All variants share their initial noise: a correction of size 0 is the quantized sampler, bit for bit."""
    mjhq = [*MJHQ_EVAL, f"eval.mjhq_dir={fake_mjhq(tmp_path / 'mjhq')}", "eval.num_prompts=4"]
    metrics, run_dir = run_tiny([*QUANT, *mjhq, "corrector.qdrift.drift_scale=0.0"])
    for i in range(4):
        assert (run_dir / f"images/qdrift/{i}.png").read_bytes() == (run_dir / f"images/quant/{i}.png").read_bytes()
    assert metrics["variants"]["qdrift"]["fid_delta_vs_quant"] == 0.0


@pytest.mark.parametrize("target", ["quant/*/state.safetensors", "calib/*/pool.safetensors", "images/*/0.png",
                                    "images/*/manifest.json"])
def test_damaged_cache_files_are_recomputed(run_tiny, tmp_path, caplog, target):
    reference = run_tiny(QUANT, cache=tmp_path / "shared")
    victims = sorted((tmp_path / "shared").glob(target))
    assert victims
    for victim in victims:
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])        # truncated
    again = run_tiny(QUANT, cache=tmp_path / "shared")
    assert "damaged" in caplog.text and str(victims[0].parent) in caplog.text
    assert_same_run(again, reference)


def test_a_run_directory_is_never_reused(run_tiny, tmp_path):
    run_tiny(["quant=none", "corrector=none"], run_name="same")
    with pytest.raises(ConfigError, match="already holds a run"):
        run_tiny(["quant=none", "corrector=none"], run_name="same")


def test_two_processes_share_the_work(tmp_path):
    """Two runs started together on one cache: each artifact is computed once, both finish alike."""
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "run.py", "model=tiny_pixart", "eval=smoke", "eval.num_prompts=4", "batch_size=2",
            "sampler.steps=3", *QUANT, "calib.num_runs=2", "corrector=qdrift", "logger=none", f"output_root={tmp_path}",
            "hydra.verbose=qdrift"]   # image batches log their building at DEBUG
    procs = [subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    computed = re.findall(r"cache: computing (\S+)", "".join(out + err for out, err in outs))
    assert computed and len(computed) == len(set(computed))   # nothing computed twice
    # quantized state, one calibration block, 2 batches x 3 variants of images (FP and quant differ)
    assert len([c for c in computed if c.startswith("quant/")]) == 1
    assert len([c for c in computed if c.startswith("images/")]) == 6
    run_dirs = [Path(out.strip().splitlines()[-1]) for out, _ in outs]
    assert run_dirs[0] != run_dirs[1]
    metrics = [json.loads((d / "metrics.json").read_text())["variants"] for d in run_dirs]
    assert metrics[0] == metrics[1]
