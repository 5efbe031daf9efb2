"""Hydra glue: validate a run (or every job of a sweep) before Hydra creates its directory, and log
a sweep's progress from the process that launched it.

Registered in conf/config.yaml under `hydra.callbacks`. Hydra makes the run directory, and so
fails with a traceback on an unwritable output_root, before `run.py` gets control; a callback
runs earlier. A bad config prints one line `error: ...` and exits with code 2 (SystemExit passes
through Hydra's error reporting, which catches Exception only).
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .config import ConfigError, check_writable, validate
from .progress import hms, interval

log = logging.getLogger("qdrift")


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

    # The sweeper's `params` (hydra.sweeper.params in a config) sweep too, before the command line's.
    params = config.hydra.sweeper.get("params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        parsed = OverridesParser.create().parse_overrides(overrides)
        jobs = BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]
    except (HydraException, ValueError, TypeError):   # a sweep the basic sweeper cannot expand (an interval):
        return []                                     # each job is still validated by the runner
    loader = GlobalHydra.instance().config_loader()
    return [loader.load_sweep_config(config, list(job)) for job in jobs]


class SweepProgress(Callback):
    """`sweep: 3/8 jobs done (0 failed), 0:12:04 elapsed, about 0:20:07 left` every
    QDRIFT_PROGRESS_INTERVAL seconds (default 30) in the launcher's log, whatever the launcher
    (basic, joblib, submitit local or Slurm): a job counts once the runner's status.json in its
    directory says `done` or `failed`, written since the sweep started (a sweep folder reused by a
    resumed sweep keeps the earlier jobs' folders). The estimate assumes the remaining jobs take as long as the finished ones did."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __getstate__(self) -> dict:   # launchers pickle Hydra's callbacks into each job: the watcher stays here
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A grid's size, or the trial count of a sweeper that draws its jobs (Optuna).
        total = len(sweep_configs(config)) or int(config.hydra.sweeper.get("n_trials") or 0)
        if total:
            monitor = SweepMonitor(Path(config.hydra.sweep.dir), total)
            self._thread = threading.Thread(target=monitor.watch, args=(self._stop,), daemon=True)
            self._thread.start()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


class SweepMonitor:
    def __init__(self, sweep_dir: Path, total: int):
        self.sweep_dir, self.total, self.start = sweep_dir, total, time.monotonic()
        # Status files already there belong to an earlier sweep resumed into this folder; one counts
        # again once rewritten. File times are compared with themselves, never with this machine's clock.
        self.earlier = {p: _mtime(p) for p in sweep_dir.glob("*/status.json")}
        self.reported: tuple[int, int] | None = None

    def counts(self) -> tuple[int, int]:
        """(done, failed) among this sweep's job directories."""
        done = failed = 0
        for status in self.sweep_dir.glob("*/status.json"):
            try:
                if self.earlier.get(status) == _mtime(status):   # untouched since an earlier sweep
                    continue
                state = json.loads(status.read_text()).get("status")
            except (OSError, ValueError):
                continue
            if state in ("done", "failed"):   # "running": started, or requeued after a failure
                done += 1
                failed += state == "failed"
        return done, failed

    def line(self) -> str:
        done, failed = self.counts()
        elapsed = time.monotonic() - self.start
        text = f"sweep: {done}/{self.total} jobs done ({failed} failed), {hms(elapsed)} elapsed"
        if 0 < done < self.total:
            text += f", about {hms(elapsed / done * (self.total - done))} left"
        return text

    def watch(self, stop: threading.Event) -> None:
        while not stop.wait(interval()):
            self.report()
        self.report(final=True)

    def report(self, final: bool = False) -> None:
        counts = self.counts()
        if counts != self.reported or final:   # a line when something changed, and a last one
            self.reported = counts
            log.info(self.line())
