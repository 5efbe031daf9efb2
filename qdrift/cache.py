"""Cached stage artifacts: content keys, manifests and atomic writes.

An artifact lives in `<cache_dir>/<stage>/<key>/`, where the key hashes the config subset the
stage depends on, and is complete once its `manifest.json` exists (written last, atomically).
Files inside are written to a temporary name and renamed, so a crash never leaves a half-written
file that a later run would take as done.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

_PACKAGES = ("torch", "diffusers", "transformers", "qdrift")


def plain(obj):
    """OmegaConf nodes -> plain (resolved) Python containers; everything else unchanged."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def config_key(*parts, length: int = 16) -> str:
    """A stable hash of config subsets (dict key order does not matter)."""
    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def text_hash(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(plain(obj), indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_save_image(image, path: str | Path) -> None:
    """Save a PIL image as PNG atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


class Artifact:
    """One cached stage output, keyed by the config subset it depends on."""

    def __init__(self, cache_dir: str | Path, stage: str, config: Mapping, seed: int | None = None):
        self.config = plain(config)
        self.key = config_key(stage, self.config)
        self.path = Path(cache_dir) / stage / self.key
        self.stage, self.seed = stage, seed

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def done(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def file(self, name: str) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path / name

    def finish(self, **extra) -> None:
        """Mark the artifact complete: write its manifest last."""
        atomic_write_json(self.manifest_path, {
            "stage": self.stage, "key": self.key, "config": self.config, "seed": self.seed,
            "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
        })


def link_or_copy(src: Path, dst: Path) -> None:
    """Expose a cached file in a run directory: a hard link when possible, else a copy."""
    import shutil

    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
