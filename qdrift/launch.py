"""Hydra glue: validate a run (or every job of a sweep) before Hydra creates its directory.

Registered in conf/config.yaml under `hydra.callbacks`. Hydra makes the run directory, and so
fails with a traceback on an unwritable output_root, before `run.py` gets control; a callback
runs earlier. A bad config prints one line `error: ...` and exits with code 2 (SystemExit passes
through Hydra's error reporting, which catches Exception only).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .config import ConfigError, check_writable, validate


def fail(err: ConfigError):
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2)


class ValidateBeforeLaunch(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            validate(config)
            check_writable(config.cache_dir, config.hydra.run.dir)   # cache first: a bad one leaves no run dir
        except ConfigError as err:
            fail(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Every job of the sweep, on the submitting machine, before any job is launched."""
        try:
            for job in sweep_configs(config):
                try:
                    validate(job)
                except ConfigError as err:
                    raise ConfigError(f"{' '.join(job.hydra.overrides.task)}: {err}") from None
            check_writable(config.cache_dir, Path(config.hydra.sweep.dir).parent)
        except ConfigError as err:
            fail(err)


def sweep_configs(config: DictConfig) -> list[DictConfig]:
    """The config of each job of a grid sweep (Hydra's basic sweeper expands it the same way)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = list(config.hydra.overrides.task)
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    except (HydraException, ValueError, TypeError):   # a sweep the basic sweeper cannot expand (an interval):
        return []                                     # each job is still validated by the runner
    loader = GlobalHydra.instance().config_loader()
    return [loader.load_sweep_config(config, list(job)) for job in jobs]
