"""Local weight files: this project never downloads them, so a missing file is a clear, actionable error."""
from __future__ import annotations

import os
from pathlib import Path


def require_weights_file(path: str | os.PathLike | None, what: str, source: str, config_key: str) -> Path:
    """Return `path` if it is a file, else raise FileNotFoundError saying what to download and which key to set."""
    if path is not None and Path(path).is_file():
        return Path(path)
    where = "no path was given" if path is None else f"{path} does not exist"
    raise FileNotFoundError(
        f"{what} is needed but {where}. It is never downloaded automatically: fetch {source}, "
        f"put it on this machine and set {config_key}=/path/to/file"
    )
