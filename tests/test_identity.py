"""The weights identity that joins every cache key: content, never a name that can point at other bytes."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import torch
from omegaconf import OmegaConf

from qdrift.models import identity
from qdrift.models.tiny import build_tiny


def _cfg(**kw):
    return OmegaConf.create({"name": "m", "source": "hub", "hub_id": "org/model", "revision": "main", **kw})


def test_tiny_identity_follows_tensors_and_configs_and_is_stable_across_processes():
    tiny = OmegaConf.create({"name": "tiny_pixart", "source": "tiny"})
    base = identity.weights_identity(tiny, build_tiny("pixart"))
    assert identity.weights_identity(tiny, build_tiny("pixart")) == base
    other = build_tiny("pixart")
    with torch.no_grad():
        next(other.transformer.parameters()).view(-1)[0] += 1e-3
    assert identity.weights_identity(tiny, other)["tensors"] != base["tensors"]
    other = build_tiny("pixart")
    other.scheduler.register_to_config(beta_end=0.03)
    assert identity.weights_identity(tiny, other)["configs"] != base["configs"]
    code = ("from omegaconf import OmegaConf; from qdrift.models import identity; from qdrift.models.tiny import "
            "build_tiny; print(identity.weights_identity(OmegaConf.create({'source': 'tiny'}), build_tiny('pixart')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == str(base)   # no hash-order or address in it


def test_bench_identity_is_the_files_sha256():
    from qdrift.bench.models import bench_weight_files

    ident = identity.weights_identity(OmegaConf.create({"name": "bench_dit", "source": "bench"}))
    files = bench_weight_files("bench_dit")
    assert ident == {"bench_files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}


def test_hub_identity_is_the_resolved_commit(tmp_path, monkeypatch):
    """A branch name resolves to the commit the local hub cache holds for it."""
    repo = tmp_path / "hub" / "models--org--model"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert identity.weights_identity(_cfg()) == {"commit": "b" * 40}
    assert identity.weights_identity(_cfg(revision="a" * 40)) == {"commit": "a" * 40}


def test_local_snapshot_identity_follows_file_contents(tmp_path):
    (tmp_path / "unet").mkdir()
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"weights-1")
    (tmp_path / "model_index.json").write_text("{}")
    first = identity.weights_identity(_cfg(local_path=str(tmp_path)))
    weights.write_bytes(b"weights-2")
    assert identity.weights_identity(_cfg(local_path=str(tmp_path))) != first


def test_local_snapshot_uses_the_hubs_recorded_hash_only_while_it_describes_the_file(tmp_path):
    """`hf download --local-dir` records commit, etag and time per file; a file changed later is hashed."""
    import os
    import time

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights-1")
    meta = tmp_path / ".cache" / "huggingface" / "download" / "model.safetensors.metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text(f"{'c' * 40}\netag-1\n{time.time() + 5}\n")
    recorded = identity.local_snapshot_digest(tmp_path)
    meta.write_text(f"{'c' * 40}\netag-2\n{time.time() + 5}\n")
    assert identity.local_snapshot_digest(tmp_path) != recorded          # the recorded hash is what counts
    meta.write_text(f"{'c' * 40}\netag-2\n{time.time() - 1000}\n")     # written long before the file
    stale = identity.local_snapshot_digest(tmp_path)
    weights.write_bytes(b"weights-2")
    os.utime(weights, (time.time() + 1, time.time() + 1))
    assert identity.local_snapshot_digest(tmp_path) != stale            # so the bytes are hashed
