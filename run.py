"""qdrift entry point: `python run.py model=pixart quant=svdquant_w3a4 sampler=dpmpp calib.num_runs=5`."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qdrift.config import ConfigError
from qdrift.eval import format_table


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from qdrift import runner

    run_dir = HydraConfig.get().runtime.output_dir
    try:
        result = runner.run(cfg, run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_table(result["variants"]))
    print(run_dir)  # the last line is the run directory


if __name__ == "__main__":
    main()
