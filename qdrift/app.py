"""The run command (`qdrift run ...`, `python run.py ...`): Hydra composes qdrift/conf, the runner runs.

Under torchrun every rank first joins the process group and takes rank 0's run-directory name, so
all ranks write into one directory.
"""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qdrift import distributed
from qdrift.cache import CacheError
from qdrift.config import ConfigError, run_id, set_run_id  # also registers the config's resolvers
from qdrift.eval import format_header, format_table
from qdrift.signals import Terminated, terminate_on_sigterm


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from qdrift import runner

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        with terminate_on_sigterm():   # scancel / time limit: the runner's cleanup still runs
            result = runner.run(cfg, run_dir)
    except (ConfigError, CacheError) as err:
        if distributed.world().is_main:   # one line, not one per rank
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print(f"error: terminated (SIGTERM); {run_dir} keeps what was finished and a rerun resumes from the cache",
              file=sys.stderr)
        raise
    if result is None:   # a torchrun rank after the first: rank 0 prints and logs
        return
    print(format_header(result["config"], result["num_prompts"]))
    print(format_table(result["variants"]))
    print(run_dir)  # the last line is the run directory
    return objective(cfg, result)


def objective(cfg: DictConfig, result: dict) -> float | None:
    """With `objective=<variant>`: that variant's FID change vs the quantized model, which Hydra's Optuna
    sweeper minimises (README, "Beyond the paper"); None otherwise."""
    name = cfg.get("objective")
    if name is None:
        return None
    from qdrift.report import fid_delta

    value = fid_delta(result["variants"][name])
    if value is None:
        raise RuntimeError(f"objective={name}: the run has no FID delta for it (eval.reference=none?)")
    return float(value)


def main() -> None:
    """Hydra reads the overrides from sys.argv[1:]."""
    if distributed.init().distributed:   # torchrun: every rank names the run directory as rank 0 does
        set_run_id(distributed.broadcast(run_id()))
    try:
        _main()
    finally:
        distributed.finish()
