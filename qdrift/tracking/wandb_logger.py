"""Weights & Biases logging that can never break a run.

Offline mode (the default) needs no account: runs land in `<run dir>/wandb/` and upload later with
`wandb sync <run dir>/wandb/offline-run-*`. Any W&B failure is a warning; `finish()` always runs.
Online mode gives up after `logger.init_timeout` seconds when the server cannot be reached (W&B's
own default is 90 s), so a compute node without network loses only its W&B run.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("qdrift")
DEFAULT_INIT_TIMEOUT = 10.0   # seconds; conf/logger/wandb.yaml sets logger.init_timeout


class WandbLogger:
    def __init__(self, logger_cfg, run_dir: Path, config: dict, name: str):
        self.run = None
        if logger_cfg.kind != "wandb" or logger_cfg.mode == "disabled":
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(
                project=logger_cfg.project, entity=logger_cfg.get("entity"), group=logger_cfg.get("group"),
                tags=list(logger_cfg.get("tags") or []), mode=logger_cfg.mode, dir=str(run_dir), name=name,
                config=config, reinit="finish_previous",
                settings=wandb.Settings(init_timeout=float(logger_cfg.get("init_timeout", DEFAULT_INIT_TIMEOUT))),
            )
        except Exception as err:  # noqa: BLE001 - tracking must not take a run down
            log.warning("W&B init failed, continuing without it (logger.init_timeout=%s): %s",
                        logger_cfg.get("init_timeout", DEFAULT_INIT_TIMEOUT), _one_line(err))
            self.run = None

    def log_results(self, metrics: dict, timings: dict, image_dirs: dict[str, Path], prompts: list[str],
                    num_images: int) -> None:
        if self.run is None:
            return
        try:
            import wandb

            flat = {f"{variant}/{k}": v for variant, m in metrics.items() for k, v in m.items()}
            flat.update({f"timing/{k}": v for k, v in timings.items()})
            self.run.log(flat)
            self.run.summary.update(flat)
            names = list(image_dirs)
            table = wandb.Table(columns=["index", "prompt", *names])
            for i in range(min(num_images, len(prompts))):
                table.add_data(i, prompts[i], *[wandb.Image(str(image_dirs[n] / f"{i}.png")) for n in names])
            self.run.log({"samples": table})
        except Exception as err:  # noqa: BLE001
            log.warning("W&B logging failed, continuing: %s", _one_line(err))

    def finish(self, failed: bool = False) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=1 if failed else 0)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B finish failed: %s", _one_line(err))
        self.run = None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())
