"""Bad or missing input: one line `error: ...`, exit code 2, before any model loads or any directory exists.

Most cases call `validate` on a composed config (milliseconds); a few run `python run.py` to prove the
Hydra callback path (no traceback, no run directory) end to end.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from qdrift.config import ConfigError, validate

from .conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_pixart", "eval=smoke", "logger=none"]


def refused(overrides, tmp_path=None, **kwargs) -> str:
    cfg = compose_cfg(list(overrides), tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


# --- every typed field: Hydra parses `seed=abc` as a string, so types are checked, not only ranges ----

@pytest.mark.parametrize("override,message", [
    ("calib.trim_std=abc", "calib.trim_std must be a number, got 'abc'"),
    ("seed=abc", "seed must be an integer >= 0, got 'abc'"),
    ("seed=1.5", "seed must be an integer >= 0, got 1.5"),
    ("seed=-1", "seed must be an integer >= 0"),
    ("corrector.qdrift.drift_scale=abc", "corrector.qdrift.drift_scale must be a number >= 0, got 'abc'"),
    ("corrector.qdrift.drift_scale=true", "corrector.qdrift.drift_scale must be a number >= 0, got True"),
    ("corrector.qdrift.bias_removal=maybe", "corrector.qdrift.bias_removal must be true or false, got 'maybe'"),
    ("corrector.qdrift.bias_removal=1", "corrector.qdrift.bias_removal must be true or false, got 1"),
    ("calib.seed=abc", "calib.seed must be an integer >= 0, got 'abc'"),
    ("calib.batch_size=two", "calib.batch_size must be an integer >= 1"),
    ("sampler.steps=abc", "sampler.steps must be an integer >= 1, got 'abc'"),
    ("sampler.steps=2.5", "sampler.steps must be an integer >= 1, got 2.5"),
    ("sampler.guidance=abc", "sampler.guidance must be a number >= 0, got 'abc'"),
    ("eval.num_resamples=abc", "eval.num_resamples must be an integer >= 1, got 'abc'"),
    ("eval.num_resamples=0", "eval.num_resamples must be an integer >= 1, got 0"),
    ("eval.kid_subset_size=abc", "eval.kid_subset_size must be an integer >= 2, got 'abc'"),
    ("eval.kid_subset_size=1", "eval.kid_subset_size must be an integer >= 2, got 1"),
    ("eval.num_prompts=1", "eval.num_prompts must be an integer >= 2"),
    ("batch_size=abc", "batch_size must be an integer >= 1, got 'abc'"),
    ("cuda_graph=maybe", "cuda_graph must be true or false, got 'maybe'"),
    ("model.resolution=big", "model.resolution must be an integer >= 1"),
    ("logger.init_timeout=soon", "logger.init_timeout must be a number >= 0.1, got 'soon'"),
    ("quant.w_bits=abc", "quant=svdquant_w3a4"),
    ("eval.reference=directory", "eval.reference=directory does not exist for eval.prompt_set=builtin"),
])
def test_every_field_is_type_checked(override, message):
    overrides = [*TINY, "logger=wandb", override] if override.startswith("logger.") else [*TINY, override]
    assert message in refused(overrides)


# --- configurations that cannot do what they say -------------------------------------------------

def test_v_prediction_with_euler_and_a_corrector_is_refused():
    """drift/rules.py has no Euler rule for v-prediction: today this crashes in generate, after calibration."""
    base = ["model=tiny_sd", "model.prediction=v_prediction", "eval=smoke", "logger=none"]
    msg = refused([*base, "sampler=euler"])
    assert "cannot run with sampler=euler on a v_prediction-prediction model" in msg and "corrector=none" in msg
    refused([*base, "sampler=euler_a"])
    validate(compose_cfg([*base, "sampler=euler", "corrector=none"]))   # no corrector: plain Euler runs
    validate(compose_cfg([*base, "sampler=ddim", "corrector=all"]))     # DDIM and DPM-Solver++ have rules
    validate(compose_cfg([*base, "sampler=dpmpp", "corrector=all"]))


def test_ddim_eta_outside_0_1_is_refused():
    """eta is DDIM's step argument (the pipeline call passes it); more in tests/test_ddim_eta.py."""
    msg = refused([*TINY, "sampler=ddim", "+sampler.options.eta=1.5", "corrector=none"])
    assert "sampler.options.eta=1.5 is out of range" in msg
    validate(compose_cfg([*TINY, "sampler=ddim", "+sampler.options.eta=0.0"]))   # deterministic DDIM
    validate(compose_cfg([*TINY, "sampler=ddim", "+sampler.options.eta=0.5", "corrector=[ptqd,d2dpm]"]))


def test_unknown_or_bad_sampler_options_are_refused():
    assert "not settings of DPMSolverMultistepScheduler" in refused([*TINY, "+sampler.options.karras=true"])
    assert "sampler=dpmpp" in refused([*TINY, "+sampler.options.algorithm_type=fancy"])
    validate(compose_cfg([*TINY, "+sampler.options.use_karras_sigmas=true"]))


@pytest.mark.parametrize("stochastic", [
    ["sampler=dpmpp", "+sampler.options.algorithm_type=sde-dpmsolver++"],
    ["model=tiny_flux", "sampler=flow_euler", "+sampler.options.stochastic_sampling=true"],
])
def test_qdrift_without_effect_on_stochastic_samplers_is_refused(stochastic, caplog):
    """rules.coefficients: no drift correction on stochastic samplers; bias removal, PTQD and D2DPM still act."""
    msg = refused([*TINY, *stochastic])
    assert "corrector.qdrift: Q-Drift's drift correction is off on stochastic samplers" in msg
    for acting in (["corrector=ptqd"], ["corrector=d2dpm"], ["corrector.qdrift.bias_removal=true"],
                   ["corrector=qdrift_plus"]):
        with caplog.at_level(logging.WARNING, logger="qdrift"):
            validate(compose_cfg([*TINY, *stochastic, *acting]))
    assert "only Q-Drift's bias or mean removal acts" in caplog.text


def test_ptq_seeds_must_not_overlap_evaluation_seeds():
    # PTQ calibration prompt j uses 6,000,000 + quant.seed * 10,000,000 + j.
    msg = refused([*TINY, "quant=rtn_w8a8", "seed=6000000"])
    assert "PTQ calibration seeds [6000000," in msg and "overlap evaluation seeds" in msg
    validate(compose_cfg([*TINY, "quant=none", "seed=6000000"]))


def test_calibration_seeds_count_whole_batches():
    # K = 1 in batches of 8 computes runs 0..7: seeds [10, 18) reach the evaluation seeds from 15.
    msg = refused([*TINY, "calib.num_runs=1", "calib.batch_size=8", "calib.seed=10", "seed=15"])
    assert "calibration seeds [10, 18) overlap evaluation seeds [15, 23)" in msg


def test_prompt_overlap_is_refused(monkeypatch):
    from qdrift.prompts import BuiltinPrompts

    monkeypatch.setattr(BuiltinPrompts, "calib_prompts", lambda self, n, seed=0: self.eval_prompts(n))
    assert "calibration prompts of the builtin prompt set are also evaluation prompts" in refused(TINY)


# --- prompt counts ---------------------------------------------------------------------------------

def test_prompt_count_above_the_builtin_set():
    assert "eval.num_prompts=1009 is more than the 1008 evaluation prompts of the builtin prompt set" in refused(
        [*TINY, "eval.num_prompts=1009"])
    validate(compose_cfg([*TINY, "eval.num_prompts=1008"]))


def test_calibration_prompts_beyond_the_builtin_set():
    msg = refused([*TINY, "calib.num_runs=1005", "calib.batch_size=10"])
    assert msg == ("this run needs 1010 calibration prompts (Q-Drift: 1010 = calib.num_runs=1005 in whole batches of "
                   "calib.batch_size=10; PTQ: 128 = quant.calib_prompts) but the builtin prompt set has 1008 outside "
                   "its evaluation split")


def write_mjhq(root: Path, n: int, images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    meta = {f"id{i:04d}": {"prompt": f"prompt number {i}", "category": "people"} for i in range(n)}
    (root / "meta_data.json").write_text(json.dumps(meta))
    if images:
        (root / "people").mkdir(exist_ok=True)
        for key in meta:
            (root / "people" / f"{key}.jpg").write_bytes(b"")
    return root


def mjhq_run(tmp_path, *extra):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    return ["model=tiny_pixart", "eval=mjhq", "logger=none", "quant=none", "eval.features=pixels", "eval.clip=none",
            f"eval.mjhq_dir={tmp_path / 'mjhq'}", f"eval.inception_weights={weights}", *extra]


def test_mjhq_folder_is_checked(tmp_path):
    assert "eval.mjhq_dir is not set" in refused(mjhq_run(tmp_path, "eval.mjhq_dir=null"))
    assert "is not a directory" in refused(mjhq_run(tmp_path))
    (tmp_path / "mjhq").mkdir()
    msg = refused(mjhq_run(tmp_path))
    assert "meta_data.json not found" in msg and "hf download playgroundai/MJHQ-30K --repo-type dataset" in msg
    write_mjhq(tmp_path / "mjhq", 20, images=False)
    assert "10 of 10 MJHQ reference images are missing" in refused(
        mjhq_run(tmp_path, "eval.num_prompts=10", "eval.eval_split=10"))


def test_mjhq_prompt_counts(tmp_path):
    write_mjhq(tmp_path / "mjhq", 20)
    validate(compose_cfg(mjhq_run(tmp_path, "eval.num_prompts=10", "eval.eval_split=10", "calib.num_runs=2",
                                  "calib.batch_size=2")))
    assert "eval.num_prompts=21 is more than the 20 evaluation prompts of the mjhq prompt set" in refused(
        mjhq_run(tmp_path, "eval.num_prompts=21"))
    msg = refused(mjhq_run(tmp_path, "eval.num_prompts=16", "eval.eval_split=16", "calib.num_runs=5",
                           "calib.batch_size=8"))
    assert "needs 8 calibration prompts" in msg and "has 4 outside its evaluation split" in msg


def test_mjhq_duplicate_texts_are_refused(tmp_path):
    """Distinct MJHQ entries may share a prompt: calibration would still see an evaluation prompt."""
    root = write_mjhq(tmp_path / "mjhq", 12)
    meta = json.loads((root / "meta_data.json").read_text())
    meta["id0011"]["prompt"] = meta["id0000"]["prompt"]
    (root / "meta_data.json").write_text(json.dumps(meta))
    msg = refused(mjhq_run(tmp_path, "eval.num_prompts=10", "eval.eval_split=10", "calib.num_runs=2",
                           "calib.batch_size=2"))
    assert "1 calibration prompts of the mjhq prompt set are also evaluation prompts, e.g. 'prompt number 0'" in msg


# --- weights ---------------------------------------------------------------------------------------

def test_evaluation_weights_are_checked_before_generating(tmp_path, empty_hub_cache):
    """A paper run without evaluation weights used to fail only after generating every image."""
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model_index.json").write_text("{}")
    write_mjhq(tmp_path / "mjhq", 4 + 128)   # SVDQuant calibrates on 128 prompts
    paper = ["experiment=paper_pixart_svdquant_w3a4", "logger=none", f"model.local_path={snap}",
             f"eval.mjhq_dir={tmp_path / 'mjhq'}", "eval.num_prompts=4", "eval.eval_split=4", "calib.num_runs=2",
             "batch_size=2"]
    msg = refused(paper)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "eval.inception_weights=" in msg
    inception = tmp_path / "inception.pth"
    inception.write_bytes(b"")
    msg = refused([*paper, f"eval.inception_weights={inception}"])
    assert "CLIP weights for ViT-L-14-quickgelu" in msg and "eval.clip_weights=" in msg
    clip = tmp_path / "clip.bin"
    clip.write_bytes(b"")
    ready = [*paper, f"eval.inception_weights={inception}", f"eval.clip_weights={clip}"]
    validate(compose_cfg(ready))
    msg = refused([*ready, f"+eval.lpips_weights={tmp_path / 'alexnet.pth'}"])   # asked for: must exist
    assert "alexnet-owt-7be5be79.pth" in msg and "eval.lpips_weights=" in msg


def test_model_weights_are_checked(tmp_path, empty_hub_cache):
    msg = refused(["model=sdxl", "logger=none"])
    assert "stabilityai/stable-diffusion-xl-base-1.0 (revision main) is not in the Hugging Face cache" in msg
    assert "model.local_path=" in msg and "model.allow_download=true" in msg
    validate(compose_cfg(["model=sdxl", "logger=none", "model.allow_download=true"]))
    assert "is not a diffusers snapshot" in refused(["model=sdxl", "logger=none", f"model.local_path={tmp_path}"])
    # A snapshot in the hub cache (the layout huggingface_hub writes) is found offline.
    repo = empty_hub_cache / "models--stabilityai--stable-diffusion-xl-base-1.0"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model_index.json").write_text("{}")
    validate(compose_cfg(["model=sdxl", "logger=none"]))
    assert "(revision v2) is not in" in refused(["model=sdxl", "logger=none", "model.revision=v2"])


def test_download_hint_names_the_installed_command(empty_hub_cache):
    msg = refused(["model=pixart", "logger=none"])
    command = re.search(r"`(\S+) download PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --revision main --local-dir ", msg)
    scripts = {ep.name for ep in importlib.metadata.distribution("huggingface_hub").entry_points
               if ep.group == "console_scripts"}
    assert command is not None and command.group(1) in scripts, (msg, scripts)


# --- the command line: the Hydra callback --------------------------------------------------------------

def run_py(*args, timeout=300):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(out, start: str):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {start}"), out.stderr[-2000:]


@pytest.mark.slow  # a `python run.py` process
def test_bad_value_fails_before_hydra_makes_a_run_dir(tmp_path):
    """`calib.trim_std=abc` used to fail only after quantization."""
    out = run_py(*TINY, "calib.trim_std=abc", f"output_root={tmp_path / 'out'}")
    assert_one_line_error(out, "calib.trim_std must be a number, got 'abc'")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a `python run.py` process
def test_unwritable_output_root_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = run_py(*TINY, f"output_root={blocker / 'out'}")
    assert_one_line_error(out, f"output directory {blocker / 'out'}/cache ")   # the cache is checked first
    assert "is not writable" in out.stderr


@pytest.mark.slow  # a `python run.py` process
def test_multirun_validates_every_job_before_launching(tmp_path):
    out = run_py("-m", *TINY, f"output_root={tmp_path}", "calib.num_runs=1,0")
    assert_one_line_error(out, "")
    assert out.stderr.strip().endswith("calib.num_runs=0: calib.num_runs (K) must be an integer >= 1, got 0")
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow  # a `python run.py` process
def test_runs_started_together_get_distinct_directories(tmp_path):
    """Run directories are named to the second; a per-process suffix separates simultaneous runs."""
    env = dict(os.environ, WANDB_MODE="disabled")
    cmd = [sys.executable, "run.py", "--cfg", "all", "--resolve", *TINY, f"output_root={tmp_path}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    dirs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        dirs.append(re.findall(r"^\s+dir: (.+)$", out, re.M))   # hydra.run.dir, hydra.sweep.dir
    (run_a, sweep_a), (run_b, sweep_b) = dirs
    assert run_a != run_b and sweep_a != sweep_b
    for d in (run_a, run_b):
        assert re.fullmatch(rf"{re.escape(str(tmp_path))}/runs/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d_tiny_pixart_"
                            r"svdquant_w3a4_[0-9a-f]{6}", d), d


def test_run_suffix_is_fixed_per_process():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": "${run_suffix:}", "b": "${run_suffix:}"})
    assert cfg.a == cfg.b and re.fullmatch(r"[0-9a-f]{6}", cfg.a)
    assert OmegaConf.create({"c": "${run_suffix:}"}).c == cfg.a


def test_runner_still_validates_when_called_directly(tmp_path, monkeypatch):
    """Tests and scripts call runner.run without Hydra: the same checks run there."""
    from qdrift import runner
    from qdrift.stages import build

    monkeypatch.setattr(build, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    cfg = compose_cfg([*TINY, "calib.trim_std=abc"], tmp_path)
    with pytest.raises(ConfigError, match="calib.trim_std must be a number"):
        runner.run(cfg, tmp_path / "run")
    cfg = compose_cfg(["model=pixart", "logger=none"], tmp_path)
    with open_dict(cfg):
        cfg.model.local_path = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="is not a diffusers snapshot"):
        runner.run(cfg, tmp_path / "run")


# --- logs a cluster user can read: progress off a terminal, the table's header -------------------------

@pytest.fixture
def log_file_progress(monkeypatch):
    import qdrift.progress

    monkeypatch.setattr(qdrift.progress, "interactive", lambda: False)   # as in a Slurm log
    monkeypatch.delenv("QDRIFT_PROGRESS_INTERVAL", raising=False)


def test_progress_never_repeats_its_last_line(log_file_progress, caplog, monkeypatch):
    """Every step past the interval logs once; closing adds a line only for steps not yet reported."""
    from qdrift.progress import progress

    monkeypatch.setenv("QDRIFT_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="qdrift"):
        for _ in progress(range(3), desc="calibration", unit="block"):
            pass
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "calibration: 1/3 block (33%)", "calibration: 2/3 block (67%)", "calibration: 3/3 block (100%)"]


def test_progress_off_a_terminal_is_a_few_lines(log_file_progress, caplog, capsys):
    from qdrift.progress import progress

    with caplog.at_level(logging.INFO, logger="qdrift"):
        for _ in progress(range(1000), desc="generate fp", unit="batch"):
            pass
    lines = [r.getMessage() for r in caplog.records]
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("generate fp: 1000/1000 batch (100%)")
    err = capsys.readouterr().err
    assert "\r" not in err and "\r" not in "".join(lines)


def test_progress_lines_follow_the_interval(log_file_progress, caplog, monkeypatch):
    import time

    from qdrift.progress import progress

    monkeypatch.setenv("QDRIFT_PROGRESS_INTERVAL", "0.05")
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="qdrift"):
        for _ in progress(range(1000), desc="slow"):
            time.sleep(0.0003)
    allowed = (time.monotonic() - start) / 0.05 + 2
    assert 2 <= len(caplog.records) <= allowed


def test_nested_bars_are_silent_off_a_terminal(log_file_progress, caplog, capsys, tmp_path):
    import torch

    from qdrift.eval import PixelFeatures, feature_cache, paired_bootstrap_fid_delta
    from qdrift.progress import progress

    with caplog.at_level(logging.INFO, logger="qdrift"):
        for _ in progress(range(1000), desc="inner", nested=True):
            pass
        g = torch.Generator().manual_seed(0)
        x, y, r = (torch.randn(40, 8, generator=g) for _ in range(3))
        paired_bootstrap_fid_delta(x, y, r, num_resamples=50, progress=True)
    assert caplog.records == []
    from PIL import Image
    for i in range(5):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    with caplog.at_level(logging.INFO, logger="qdrift"):
        feature_cache(tmp_path, PixelFeatures(4), batch_size=2)
    # one bar per image set (evaluate's long work: periodic lines), its inner batches silent
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"pixel4 features of {tmp_path.name}"]
    assert "\r" not in capsys.readouterr().err


def test_table_header_names_what_was_measured():
    from qdrift.cache import plain
    from qdrift.eval import format_header

    cfg = plain(compose_cfg([*TINY, "calib.num_runs=3", "eval.num_prompts=4"]))
    line = format_header(cfg, 4)
    assert line == "qdrift  model=tiny_pixart  sampler=dpmpp (8 steps, CFG 4.5)  quant=svdquant_w3a4  K=3  prompts=4 (builtin)"
    assert "K=-" in format_header(plain(compose_cfg([*TINY, "corrector=none"])), 4)


def test_resolution_and_step_count_that_the_pipeline_cannot_run():
    assert "model.resolution=40: pixart pipelines need a multiple of 16" in refused([*TINY, "model.resolution=40"])
    msg = refused([*TINY, "sampler.steps=3", "++sampler.options.num_train_timesteps=2"])
    assert "3 sampling steps exceed the schedule's num_train_timesteps=2" in msg
