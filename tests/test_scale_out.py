"""Scaling out on existing engines: Hydra's launchers run a sweep's jobs in parallel on one shared
cache, and torchrun splits one run over processes, with the same images and metrics as one process."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qdrift.launch import SweepMonitor

from .conftest import CONF
from .test_cache_runs import QUANT, ROOT, pngs

TINY = ["model=tiny_pixart", "eval=smoke", "eval.num_prompts=4", "batch_size=2", "sampler.steps=3", *QUANT,
        "logger=none", "hydra.verbose=qdrift"]   # image batches log their building at DEBUG
ENV = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
           QDRIFT_PROGRESS_INTERVAL="1")


def qdrift(args: list[str], timeout: int = 900, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*(launcher or [sys.executable]), "run.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def job_dirs(sweep_root: Path) -> dict[str, Path]:
    """Each finished job's directory, by its K and corrector."""
    out = {}
    for metrics in sweep_root.rglob("metrics.json"):
        cfg = json.loads((metrics.parent / "config.json").read_text())
        out[f"K={cfg['calib']['num_runs']},{next(iter(cfg['corrector']))}"] = metrics.parent
    return out


@pytest.mark.slow
def test_submitit_sweep_shares_work_and_equals_separate_runs(tmp_path):
    """A 2x2 sweep (K x corrector) on submitit's local executor: every job finishes, the quantized model,
    the calibration block and the FP / quantized images are computed once, and every job's metrics and
    images equal those of the same setting run alone on an empty cache."""
    sweep = qdrift(["-m", "hydra/launcher=submitit_local", *TINY, f"output_root={tmp_path}/sweep",
                    "calib.num_runs=1,2", "corrector=qdrift,qdrift_exact"])
    logs = "".join(p.read_text() for p in (tmp_path / "sweep").rglob("*.log"))
    computed = re.findall(r"cache: computing (\S+)", logs)
    assert len(computed) == len(set(computed))                        # nothing computed twice
    assert len([c for c in computed if c.startswith("quant/")]) == 1
    assert len([c for c in computed if c.startswith("calib/")]) == 1  # K = 1 and 2 share the first block
    # 2 batches each: FP and quantized once, plus 4 corrected variants (2 correctors x 2 K)
    assert len([c for c in computed if c.startswith("images/")]) == 2 * (2 + 4)
    assert "sweep: 4/4 jobs done (0 failed)" in sweep.stdout + sweep.stderr   # the launcher's progress log

    jobs = job_dirs(tmp_path / "sweep")
    assert sorted(jobs) == ["K=1,qdrift", "K=1,qdrift_exact", "K=2,qdrift", "K=2,qdrift_exact"]
    for i, (setting, job) in enumerate(sorted(jobs.items())):
        k, corrector = setting[2:].split(",")
        alone = Path(qdrift([*TINY, f"calib.num_runs={k}", f"corrector={corrector}",
                             f"output_root={tmp_path}/alone{i}"]).stdout.strip().splitlines()[-1])
        assert json.loads((job / "metrics.json").read_text())["variants"] == \
            json.loads((alone / "metrics.json").read_text())["variants"]
        assert pngs(job) == pngs(alone)


@pytest.mark.slow
def test_local_launcher_preset_runs_jobs_in_parallel_processes(tmp_path):
    out = qdrift(["-m", "hydra/launcher=local", *TINY, "corrector=none", f"output_root={tmp_path}",
                  "seed=0,1"])
    assert "Joblib.Parallel(n_jobs=2" in out.stdout + out.stderr
    assert len(list(tmp_path.rglob("metrics.json"))) == 2


def test_slurm_preset_sets_the_documented_resources():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                 "hydra.launcher.gpus_per_node=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node) == ("gpu", 2)
    for key in ("cpus_per_task", "mem_gb", "timeout_min", "array_parallelism", "nodes", "signal_delay_s"):
        assert launcher[key] is not None, key


def test_sweep_monitor_counts_finished_and_failed_jobs(tmp_path):
    for name in ("0_earlier", "1_rerun"):   # jobs of an earlier sweep resumed into this folder
        (tmp_path / name).mkdir()
        (tmp_path / name / "status.json").write_text(json.dumps({"status": "done"}))
        os.utime(tmp_path / name / "status.json", (time.time() + 3600,) * 2)   # a file server's clock ahead
    monitor = SweepMonitor(tmp_path, total=3)
    assert monitor.line().startswith("sweep: 0/3 jobs done (0 failed)")
    for name, status in (("0_a", "done"), ("1_b", "failed")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "status.json").write_text(json.dumps({"status": status}))
    (tmp_path / "2_c").mkdir()   # started (or requeued): not counted yet
    (tmp_path / "2_c" / "status.json").write_text(json.dumps({"status": "running"}))
    line = monitor.line()
    assert line.startswith("sweep: 2/3 jobs done (1 failed)") and "left" in line
    os.utime(tmp_path / "1_rerun" / "status.json", (time.time() + 3700,) * 2)   # this sweep reran that job
    assert monitor.line().startswith("sweep: 3/3 jobs done (1 failed)")


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """torchrun --nproc_per_node=2 (gloo): the ranks split calibration blocks and image batches, and the
    run gives the same images and metrics as one process (one thread each, as torchrun sets)."""
    args = ["model=tiny_pixart", "eval=smoke", "eval.num_prompts=6", "batch_size=2", "sampler.steps=3", *QUANT,
            "logger=none", "calib.num_runs=3", "calib.batch_size=1", "corrector=all"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = qdrift([*args, f"output_root={tmp_path}/two"], launcher=launcher)
    one = qdrift([*args, f"output_root={tmp_path}/one"])
    run_two, run_one = (Path(p.stdout.strip().splitlines()[-1]) for p in (two, one))
    assert len([p for p in (tmp_path / "two" / "runs").glob("*/*") if p.is_dir()]) == 1   # one run dir
    assert json.loads((run_two / "metrics.json").read_text())["variants"] == \
        json.loads((run_one / "metrics.json").read_text())["variants"]
    assert pngs(run_two) == pngs(run_one)
    for name in ("pool.safetensors", "samples.safetensors", "summary.json"):   # blocks made by both ranks
        assert (run_two / "stats" / name).read_bytes() == (run_one / "stats" / name).read_bytes(), name
    rank1 = (run_two / "run_rank1.log").read_text()
    assert re.search(r"rank1\] Q-Drift calibration: 1 of 3 blocks", rank1)   # its share: block 1 of 0, 1, 2
    assert re.search(r"rank1\] generate qdrift: \d+/\d+ batch", rank1)


def test_cpu_thread_count_is_part_of_the_device_key():
    from qdrift.stages.context import device_kind

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = device_kind(torch.device("cpu"))
        torch.set_num_threads(2)
        assert device_kind(torch.device("cpu")) != one
    finally:
        torch.set_num_threads(threads)


def test_a_requeued_job_takes_back_its_unfinished_directory(run_tiny):
    """Slurm requeues a preempted job into its own directory: an unfinished run of the same config is
    taken back (and resumes from the cache); another config's images are never overwritten."""
    from qdrift.config import ConfigError

    metrics, run_dir = run_tiny(["quant=none", "corrector=none"], run_name="job")
    (run_dir / "metrics.json").unlink()                       # killed during evaluation
    (run_dir / "status.json").write_text(json.dumps({"status": "failed"}))
    again, _ = run_tiny(["quant=none", "corrector=none"], run_name="job")
    assert again["variants"] == metrics["variants"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "done"
    (run_dir / "metrics.json").unlink()
    (run_dir / "status.json").write_text(json.dumps({"status": "failed"}))
    with pytest.raises(ConfigError, match="holds another run's images"):
        run_tiny(["quant=none", "corrector=none", "seed=1"], run_name="job")


@pytest.mark.parametrize("preset", ["disabled", "stdout"])
def test_other_hydra_logging_presets_still_run(tmp_path, preset):
    out = qdrift(["model=tiny_pixart", "eval=smoke", "eval.num_prompts=2", "batch_size=2", "sampler.steps=2",
                  "quant=none", "corrector=none", "logger=none", f"output_root={tmp_path}",
                  f"hydra/job_logging={preset}"])
    assert (Path(out.stdout.strip().splitlines()[-1]) / "metrics.json").is_file()


def test_sweep_job_count_includes_the_sweepers_params():
    """A sweep set in a config (hydra.sweeper.params) counts like one on the command line: 2 x 2 jobs."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from qdrift.launch import sweep_configs

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", ["model=tiny_pixart"], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.sweeper.params = {"calib.num_runs": "1,2"}
            cfg.hydra.overrides.task = ["model=tiny_pixart", "seed=0,1"]
        jobs = sweep_configs(cfg)
    assert sorted((int(j.calib.num_runs), int(j.seed)) for j in jobs) == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_each_torchrun_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    from qdrift.config import ConfigError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="every rank on one GPU"):
        resolve_device("cuda:0")
    monkeypatch.setenv("WORLD_SIZE", "1")   # a plain process outside a sweep: the first GPU
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("auto") == torch.device("cuda", 0)
