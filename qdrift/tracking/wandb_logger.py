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


def run_name(config: dict, run_dir: Path) -> str:
    """Short and readable: model, quantizer, sampler, K, then the run dir's random suffix."""
    if not all(k in config for k in ("model", "quant", "sampler", "calib")):   # not a run's config
        return run_dir.name
    k = f"-K{config['calib']['num_runs']}" if config.get("corrector") else ""
    return (f"{config['model']['name']}-{config['quant']['name']}-{config['sampler']['name']}{k}-"
            f"{run_dir.name.rsplit('_', 1)[-1]}")


def run_tags(config: dict) -> list[str]:
    """Filterable on a dashboard: model, sampler, quantizer, each corrector, K."""
    if not all(k in config for k in ("model", "quant", "sampler", "calib")):
        return []
    tags = [f"model:{config['model']['name']}", f"sampler:{config['sampler']['name']}",
            f"quant:{config['quant']['name']}"]
    tags += [f"corrector:{c}" for c in (config.get("corrector") or {})]
    if config.get("corrector"):
        tags.append(f"K:{config['calib']['num_runs']}")
    return tags


def sweep_group() -> str | None:
    """The sweep's directory name for a multirun job (its jobs share a W&B group); None for a single run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return f"sweep-{Path(hc.sweep.dir).name}" if str(hc.mode) == "RunMode.MULTIRUN" else None


def experiment_group() -> str | None:
    """`experiment=NAME` on the command line: single runs of one experiment share a group."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    chosen = [o.split("=", 1)[1] for o in HydraConfig.get().overrides.task if o.startswith("experiment=")]
    return chosen[-1] if chosen else None


class WandbLogger:
    def __init__(self, logger_cfg, run_dir: Path, config: dict, name: str | None = None):
        self.run = None
        if logger_cfg.kind != "wandb" or logger_cfg.mode == "disabled":
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            sweep = sweep_group()
            self.run = wandb.init(
                project=logger_cfg.project, entity=logger_cfg.get("entity"),
                group=logger_cfg.get("group") or sweep or experiment_group(), job_type="sweep-job" if sweep else "run",
                tags=[*run_tags(config), *(logger_cfg.get("tags") or [])], mode=logger_cfg.mode, dir=str(run_dir),
                name=name or run_name(config, run_dir), config=config, reinit="finish_previous",
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

            from qdrift.report import gap_recovered

            flat = {f"{variant}/{k}": v for variant, m in metrics.items() for k, v in m.items()}
            for variant in metrics:
                gap = gap_recovered(metrics, variant) if variant not in ("fp", "quant") else None
                if gap is not None:
                    flat.update({f"{variant}/gap_recovered": gap[0], f"{variant}/gap_recovered_ci_low": gap[1],
                                 f"{variant}/gap_recovered_ci_high": gap[2]})
            flat.update({f"timing/{k}": v for k, v in timings.items()})
            self.run.summary.update(flat)
            # One image panel per variant, the same prompts in the same order (side by side on a dashboard).
            # Not a wandb.Table of images: wandb 0.31 writes such cells as the text "Image" and keeps no files.
            # The files land in <run dir>/wandb/offline-run-*/files/media, so a copied run dir syncs whole.
            shown = range(min(num_images, len(prompts)))
            images = {f"samples/{n}": [wandb.Image(str(d / f"{i}.png"), caption=f"#{i} {prompts[i]}") for i in shown]
                      for n, d in image_dirs.items()}
            table = wandb.Table(columns=["index", "prompt"], data=[[i, prompts[i]] for i in shown])
            self.run.log({**images, "samples/prompts": table})
        except Exception as err:  # noqa: BLE001
            log.warning("W&B logging failed, continuing: %s", _one_line(err))

    def log_steps(self, summary: dict) -> None:
        """Per sampling step, on a `step` axis: the residual variance V_i (scalar pooling), the spread
        of the per-channel V_i over channels (std / mean) and each corrector variant's drift factor c_i
        (`per_step/<variant>/drift_factor`, the mean over channels for channel pooling; correctors
        without drift factors, PTQD and D^2-DPM, have none), from the run's stats/summary.json."""
        if self.run is None:
            return
        try:
            import numpy as np

            self.run.define_metric("step")
            self.run.define_metric("per_step/*", step_metric="step")
            scalar = np.asarray(summary["residual_var_scalar"], dtype=float).reshape(len(summary["timesteps"]), -1)
            channel = np.asarray(summary["residual_var_channel"], dtype=float).reshape(len(scalar), -1)
            factors = {variant: np.asarray(c, dtype=float).reshape(len(scalar), -1).mean(axis=1)
                       for variant, c in (summary.get("drift_factors") or {}).items()}
            for i, t in enumerate(summary["timesteps"]):
                spread = channel[i].std() / channel[i].mean() if channel[i].mean() > 0 else 0.0
                row = {"step": i, "per_step/timestep": float(t), "per_step/V_i": float(scalar[i].mean()),
                       "per_step/channel_spread": float(spread)}
                row.update({f"per_step/{variant}/drift_factor": float(c[i]) for variant, c in factors.items()})
                self.run.log(row)
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
