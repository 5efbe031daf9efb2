"""qdrift's Hydra configs (a package, so that Hydra finds them in an installed qdrift)."""
from __future__ import annotations

from pathlib import Path


def all_correctors() -> tuple[str, ...]:
    """The corrector variants of `corrector=all`, in its order: the order tables and dashboards show them."""
    from omegaconf import OmegaConf

    return tuple(OmegaConf.load(Path(__file__).parent / "corrector" / "all.yaml").defaults)
