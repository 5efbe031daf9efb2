"""The bench model zoo: a procedural captioned dataset, small text-to-image models trained on it
(shipped in weights/), and the evaluation CLIP that judges them.

    from qdrift.bench import captions, reference_images, load_bench_pipeline, load_eval_clip

Attributes load lazily, so `import qdrift.bench.dataset` stays light (no torch) for worker processes.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "captions": "dataset", "scenes": "dataset", "reference_images": "dataset", "split_of": "dataset",
    "scene_of": "grammar", "caption_of": "grammar", "Scene": "grammar", "Obj": "grammar",
    "render": "render",
    "load_bench_pipeline": "models", "generate": "models", "reinit_denoiser": "models", "load_tokenizer": "models",
    "weights_available": "weights", "BenchWeightsError": "weights", "WEIGHTS_DIR": "weights",
    "load_eval_clip": "evalclip", "attribute_accuracy": "evalclip", "retrieval_accuracy": "evalclip",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qdrift.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
