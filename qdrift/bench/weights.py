"""The bench weights package: one safetensors file per model (fp16), configs in its metadata.

Each file carries a sha256 of its tensor bytes, so a truncated or altered file fails loudly with the
command that regenerates it. Files (all in one directory, the package's `weights/` by default):
    vae.safetensors, eval_clip.safetensors, bench_dit.safetensors, bench_unet.safetensors,
    bench_flow.safetensors, tokenizer.json, train_report.json
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

WEIGHTS_DIR = Path(__file__).with_name("weights")
FORMAT = "qdrift-bench/1"
TOKENIZER_FILE = "tokenizer.json"
REPORT_FILE = "train_report.json"
STAGE_OF_FILE = {"vae": "vae", "eval_clip": "clip", "bench_dit": "dit", "bench_unet": "unet", "bench_flow": "flow"}
REQUIRED = tuple(f"{k}.safetensors" for k in STAGE_OF_FILE) + (TOKENIZER_FILE,)


class BenchWeightsError(RuntimeError):
    """A bench weights file is missing or corrupted."""


def weights_dir(path: str | Path | None = None) -> Path:
    return Path(path) if path is not None else WEIGHTS_DIR


def regenerate_hint(file: str) -> str:
    stage = STAGE_OF_FILE.get(Path(file).name.removesuffix(".safetensors"), "all")
    return (f"regenerate it with `python experiments/train_bench.py --stage {stage} --out DIR` "
            "(see the README's bench section for the GPU command lines)")


def weights_available(path: str | Path | None = None) -> bool:
    """True when every bench weights file is present (they ship with the package)."""
    d = weights_dir(path)
    return all((d / f).is_file() for f in REQUIRED)


def _digest(blob: bytes) -> tuple[str, int]:
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len:]).hexdigest(), header_len


def save_model_file(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict, dtype=torch.float16) -> int:
    """Write `tensors` (cast to `dtype`) with `meta` (JSON-able) and a checksum; returns the file size."""
    tensors = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in tensors.items()}
    digest, _ = _digest(st_save(tensors))     # the data section does not depend on the metadata
    blob = st_save(tensors, metadata={"format": FORMAT, "sha256": digest, "meta": json.dumps(meta)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)                          # atomic: a crash never leaves half a file
    return len(blob)


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a bench weights file; BenchWeightsError naming the file if missing or corrupted."""
    path = Path(path)
    if not path.is_file():
        raise BenchWeightsError(f"bench weights file {path} is missing; {regenerate_hint(path.name)}")
    blob = path.read_bytes()
    try:
        tensors = st_load(blob)
        digest, header_len = _digest(blob)
        header = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
    except (SafetensorError, ValueError, struct.error) as err:
        raise BenchWeightsError(f"bench weights file {path} is corrupted ({err}); "
                                f"{regenerate_hint(path.name)}") from err
    if header.get("format") != FORMAT or header.get("sha256") != digest:
        raise BenchWeightsError(f"bench weights file {path} is corrupted or not a {FORMAT} file (checksum mismatch); "
                                f"{regenerate_hint(path.name)}")
    return tensors, json.loads(header["meta"])


def read_report(path: str | Path | None = None) -> dict:
    f = weights_dir(path) / REPORT_FILE
    return json.loads(f.read_text()) if f.is_file() else {}
