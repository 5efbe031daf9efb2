"""Shared test helpers: compose the Hydra config offline and run the runner in temp directories."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

CONF = str(Path(__file__).resolve().parents[1] / "conf")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Fast settings for the tiny random pipelines: few prompts, few steps, few calibration images.
FAST = [
    "model=tiny_pixart", "eval=smoke", "eval.num_prompts=4", "batch_size=4", "sampler.steps=4",
    "calib.num_runs=2", "logger=none",
]


def compose_cfg(overrides: list[str] = (), tmp_path: Path | None = None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.output_root = str(tmp_path / "outputs")
            cfg.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.fixture
def run_tiny(tmp_path):
    """Run the whole runner on a tiny pipeline; returns (metrics, run_dir)."""
    from qdrift import runner

    counter = {"n": 0}

    def _run(overrides=(), run_name=None, cache=None):
        counter["n"] += 1
        cfg = compose_cfg([*FAST, *overrides], tmp_path)
        if cache is not None:
            with open_dict(cfg):
                cfg.cache_dir = str(cache)
        run_dir = tmp_path / "runs" / (run_name or f"run{counter['n']}")
        return runner.run(cfg, run_dir), run_dir

    return _run


@pytest.fixture
def one_thread():
    """Small tensors: extra OpenMP threads only add synchronisation (~15 ms per op on a busy 2-core
    machine). Results do not depend on the thread count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
