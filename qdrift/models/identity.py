"""What the loaded weights are, as a cache-key field: never a name that can point at other bytes.

- bench: the sha256 of each shipped file the pipeline was built from;
- hub:   the resolved commit of the snapshot (a branch name such as `main` moves), or for a local
         snapshot (`model.local_path`) the hub's recorded file hashes, else the files' own sha256;
- tiny:  a digest of every tensor of the pipeline built in code, and of its components' configs and
         tokenizers' vocabularies;
- random: what makes the random weights (random_arch.py): the sha256 of the architecture file, the size,
         variant and init seed, and the tokenizers' word list (the device is part of every key already).
Digests of files are memoised per process by (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from qdrift.cache import file_sha256, tensors_sha256

_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt")


def file_digest(path: str | Path) -> str:
    path = Path(path).resolve()
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_DIGESTS:
        _FILE_DIGESTS[memo] = file_sha256(path)
    return _FILE_DIGESTS[memo]


def modules_digest(modules) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor of `modules` (name -> nn.Module)."""
    return tensors_sha256((f"{slot}.{name}", t) for slot, module in sorted(modules.items())
                          for name, t in module.state_dict().items())


def components_config_digest(pipe) -> str:
    """Digest of what an in-code pipeline builds besides tensors: each component's config (scheduler,
    models) and each tokenizer's vocabulary."""
    parts = {}
    for name, comp in sorted(pipe.components.items()):
        if hasattr(comp, "get_vocab"):
            parts[name] = sorted(comp.get_vocab().items())
        elif getattr(comp, "config", None) is not None:
            config = comp.config   # diffusers: a FrozenDict; transformers: a PretrainedConfig
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            # private entries are bookkeeping (versions, paths, a set of defaults in hash order)
            parts[name] = {k: v for k, v in config.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def weights_identity(model_cfg, pipe=None) -> dict:
    """The identity of the weights `model_cfg` loads (`pipe`: the loaded pipeline, for in-code models)."""
    source = model_cfg.source
    if source == "bench":
        from qdrift.bench.models import bench_weight_files

        return {"bench_files": {p.name: file_digest(p) for p in bench_weight_files(model_cfg.name)}}
    if source == "tiny":
        if pipe is None:
            raise ValueError("the identity of an in-code model needs its pipeline")
        modules = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
        return {"tensors": modules_digest(modules), "configs": components_config_digest(pipe)}
    if source == "random":
        from .random_arch import arch_path, vocabulary_digest

        return {"arch": model_cfg.arch, "arch_sha256": file_digest(arch_path(model_cfg.arch)),
                "arch_size": model_cfg.get("arch_size", "full"), "arch_variant": model_cfg.get("arch_variant"),
                "seed": int(model_cfg.get("seed", 0)), "vocabulary": vocabulary_digest()}
    if source == "hub":
        if model_cfg.get("local_path"):
            return {"local_files": local_snapshot_digest(Path(model_cfg.local_path))}
        return {"commit": resolved_commit(model_cfg.hub_id, model_cfg.get("revision") or "main")}
    raise ValueError(f"unknown model source {source!r}")


def resolved_commit(repo_id: str, revision: str) -> str:
    """The commit hash a revision (branch, tag or hash) resolves to in the local hub cache."""
    from huggingface_hub import snapshot_download

    path = snapshot_download(repo_id, revision=revision, local_files_only=True)
    return Path(path).name      # .../snapshots/<commit>


def local_snapshot_digest(root: Path) -> str:
    """Digest of a downloaded snapshot directory: the hub's sha256/etag per file where `hf download
    --local-dir` recorded one (cheap), the file's own sha256 otherwise."""
    h = hashlib.sha256()
    meta_dir = root / ".cache" / "huggingface" / "download"
    for f in sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts):
        rel = f.relative_to(root).as_posix()
        if not rel.endswith(WEIGHT_SUFFIXES):
            continue
        recorded = _recorded_etag(meta_dir / f"{rel}.metadata", f)
        h.update(f"{rel}|{recorded or file_digest(f)}\n".encode())
    return h.hexdigest()


def _recorded_etag(meta: Path, f: Path) -> str | None:
    """The etag in hf's local-dir metadata (lines: commit, etag, timestamp), if it still describes `f`."""
    try:
        commit, etag, stamp = meta.read_text().splitlines()[:3]
    except (OSError, ValueError):
        return None
    # The hub writes the metadata right after the file; a file changed later is hashed instead.
    return f"{commit}:{etag}" if float(stamp) >= f.stat().st_mtime - 1 else None
