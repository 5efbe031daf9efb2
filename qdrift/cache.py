"""Cached stage artifacts: chained content keys, checksummed manifests, locks, atomic writes.

An artifact lives in `<cache_dir>/<stage>/<key>/`. Its key hashes *every* input it depends on:
config values, data by content (prompt lists, weight digests), the code version of the algorithm
that made it, and the keys of the artifacts it reads (keys chain as in a build system, so a change
anywhere upstream changes every key below it and a stale artifact cannot be found).

An artifact is built once: the builder takes a file lock (other jobs wait, then read; the OS
releases the lock of a crashed holder), writes into a private staging directory, records a sha256
of every file in `manifest.json`, and renames the directory into place. So an artifact is never
half-written or written twice, and every read verifies the checksums: a truncated or altered file
is reported with its path and the artifact is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path

from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger("qdrift")

CACHE_FORMAT = 2        # bump when the layout of an artifact directory or its manifest changes
MANIFEST = "manifest.json"
_PACKAGES = ("torch", "diffusers", "transformers", "qdrift")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()   # what open() would give: group-readable under a usual umask


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
    """Content hash of a list of strings (order matters; no two lists share a hash by joining)."""
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensors_sha256(named) -> str:
    """sha256 over the name, dtype, shape and bytes of each (name, tensor) pair, read on the CPU."""
    import torch

    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------ writes
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a unique temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)   # mkstemp makes 0600; a shared cache must stay readable by the group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safetensors_bytes(tensors: dict, fmt: str, manifest: dict) -> bytes:
    """A safetensors file with its format name and JSON manifest in one metadata entry: safetensors
    writes the metadata map in no fixed order, so two entries would make equal files differ in bytes."""
    header = json.dumps({"format": fmt, "manifest": manifest}, sort_keys=True)
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"qdrift": header})


def read_safetensors(path: str | Path, fmt: str, names: set[str]) -> tuple[dict, dict]:
    """(tensors, manifest) of a `safetensors_bytes` file; ValueError if unreadable or not `fmt` with `names`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        if "qdrift" in meta:
            header = json.loads(meta["qdrift"])
        else:   # written before the single entry: "format" and "manifest" side by side
            header = {"format": meta.get("format"), "manifest": json.loads(meta["manifest"])}
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
        raise ValueError(f"corrupted file {path} ({err}); delete it to recompute") from err
    if header.get("format") != fmt or set(tensors) != names:
        raise ValueError(f"{path} is not a {fmt} file")
    return tensors, header["manifest"]


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(plain(obj), indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_save_image(image, path: str | Path) -> None:
    """Save a PIL image as PNG atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def unique_tmp(path: str | Path) -> Path:
    """A temporary name beside `path` that no other writer uses (for libraries that write by name)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def copy_file(src: str | Path, dst: str | Path) -> None:
    """An independent copy (never a link: editing a run's file must not change the cache), atomically."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_tmp(dst)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ artifacts
class CacheError(RuntimeError):
    """The cache directory holds something no run can use or repair by itself."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class Artifact:
    """One cached stage output, keyed by everything it depends on (`inputs`)."""

    def __init__(self, cache_dir: str | Path, stage: str, inputs: Mapping, seed: int | None = None):
        self.inputs = plain(inputs)
        self.key = config_key(stage, CACHE_FORMAT, self.inputs)
        self.path = Path(cache_dir) / stage / self.key
        self.stage, self.seed = stage, seed
        self._verified = False
        self._reported: str | None = None

    def __repr__(self) -> str:
        return f"Artifact({self.stage}/{self.key})"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def file(self, name: str) -> Path:
        return self.path / name

    def verify(self) -> bool:
        """True when the artifact is complete and every file matches its recorded checksum.

        A damaged artifact (unreadable manifest, missing, truncated or altered file) is reported
        with its path and reads as absent, so the caller rebuilds it.
        """
        if self._verified:
            return True
        if not self.path.exists() and not self.path.is_symlink():
            return False
        problem = self._problem()
        if problem:
            if problem != self._reported:      # say it once, however often we look
                log.warning("cache: %s is damaged (%s); recomputing it", self.path, problem)
                self._reported = problem
            return False
        self._verified = True
        return True

    def _problem(self) -> str | None:
        if not self.path.is_dir():
            return "not a directory"
        try:
            manifest = self.manifest()
        except FileNotFoundError:
            return "incomplete: no manifest"
        except (OSError, ValueError) as err:
            return f"unreadable manifest: {err}"
        if not isinstance(manifest, dict) or manifest.get("key") != self.key or not isinstance(manifest.get("files"), dict):
            return "manifest does not describe this artifact"
        for name, digest in manifest["files"].items():
            f = self.path / name
            if not f.is_file():
                return f"{name} is missing"
            try:
                if file_sha256(f) != digest:
                    return f"{name} does not match its checksum (truncated or altered)"
            except OSError as err:
                return f"{name} is unreadable ({err.strerror or err})"
        return None

    def lock(self) -> FileLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        path = self.path.parent / f"{self.key}.lock"
        if path.exists() and not path.is_file():
            raise CacheError(f"cache lock {path} is not a file: remove it")
        return FileLock(str(path), mode=FILE_MODE)

    def discard(self) -> None:
        """Remove the artifact (under its lock): for content that is intact but unusable."""
        with self.lock():
            _remove(self.path)
        self._verified = False

    def _remove_leftovers(self) -> None:
        """Under the lock: what a killed builder left (its staging dir) and any damaged artifact."""
        for stale in self.path.parent.glob(f".{self.key}.*.tmp"):
            _remove(stale)
        _remove(self.path)

    def ensure(self, build: Callable[[Path], Mapping | None], quiet: bool = False) -> "Artifact":
        """Build the artifact once if it is absent or damaged; returns self, complete and verified.

        `build(staging_dir)` writes the artifact's files into `staging_dir` and may return extra
        manifest fields. Jobs that need the same artifact wait on its lock and then read it.
        `quiet`: log the build at DEBUG (artifacts made by the hundred, like image batches).
        """
        if self.verify():
            return self
        lock = self.lock()
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("cache: waiting for another job building %s/%s", self.stage, self.key)
            lock.acquire()
        try:
            if self.verify():           # another job built it while we waited
                return self
            self._remove_leftovers()
            staging = self.path.with_name(f".{self.key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            staging.mkdir(parents=True)
            try:
                log.log(logging.DEBUG if quiet else logging.INFO, "cache: computing %s/%s", self.stage, self.key)
                extra = build(staging) or {}
                files = {p.relative_to(staging).as_posix(): file_sha256(p)
                         for p in sorted(staging.rglob("*")) if p.is_file()}
                atomic_write_json(staging / MANIFEST, {
                    "stage": self.stage, "key": self.key, "inputs": self.inputs, "seed": self.seed,
                    "files": files, "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra,
                })
                staging.rename(self.path)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._verified = True
            return self
        finally:
            lock.release()
