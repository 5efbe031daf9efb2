"""CUDA-graph replay of the denoiser: keyed by input signature; identical outputs to eager on a GPU."""
from __future__ import annotations

import pytest
import torch

from qdrift import runner
from qdrift.config import ConfigError, validate
from qdrift.models.cuda_graph import eager_forward, signature, use_cuda_graphs
from qdrift.models.tiny import tiny_pixart
from qdrift.quant import QuantSpec, quant_enabled, quantize
from qdrift.quant.calib import replay_calibrator
from qdrift.runner import graph_denoiser

from .conftest import compose_cfg


def test_signature_keys_on_shapes_dtypes_and_plain_arguments():
    x, t = torch.zeros(2, 4, 8, 8), torch.tensor([3, 3])
    base = signature((x,), {"timestep": t, "return_dict": False})
    assert base == signature((torch.ones(2, 4, 8, 8),), {"timestep": torch.tensor([9, 1]), "return_dict": False})
    assert base != signature((torch.zeros(4, 4, 8, 8),), {"timestep": t, "return_dict": False})
    assert base != signature((x.half(),), {"timestep": t, "return_dict": False})
    assert base != signature((x,), {"timestep": t, "return_dict": True})
    assert base != signature((x,), {"timestep": t})
    assert signature((x,), {"opts": {"a": [1, 2]}}) is not None        # containers are flattened
    assert signature((x,), {"cb": object.__new__(_Unhashable)}) is None  # cannot key: run eagerly


class _Unhashable:
    __hash__ = None


def test_cuda_graphs_refuse_a_cpu_model():
    with pytest.raises(ValueError, match="CUDA device"):
        use_cuda_graphs(torch.nn.Linear(2, 2))


def test_cuda_graph_option_needs_a_gpu():
    with pytest.raises(ConfigError, match="cuda_graph=true .* needs a GPU"):
        validate(compose_cfg(["device=cpu", "cuda_graph=true"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
def test_graphed_quantized_denoiser_matches_eager_per_quant_state():
    torch.manual_seed(0)
    model = tiny_pixart().transformer.to("cuda", torch.float16).eval()
    cfg = model.config
    gen = torch.Generator().manual_seed(0)

    def inputs(batch):
        return dict(hidden_states=torch.randn(batch, cfg.in_channels, 16, 16, generator=gen).to("cuda", torch.float16),
                    encoder_hidden_states=torch.randn(batch, 8, cfg.caption_channels, generator=gen).to(
                        "cuda", torch.float16),
                    timestep=torch.randint(0, 1000, (batch,), generator=gen).to("cuda"),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)

    quantize(model, QuantSpec.from_config(dict(name="w4a4", method="svdquant", w_bits=4, a_bits=4, rank=4,
                                               calib_prompts=1, calib_tokens=64)),
             "pixart", replay_calibrator(model, [((), inputs(2))]), progress=False)
    calls = [inputs(2), inputs(2), inputs(4)]
    eager = {}
    for q in (True, False):
        with quant_enabled(model, q), torch.inference_mode():
            eager[q] = [model(**c)[0].clone() for c in calls]
    graphed = graph_denoiser(model)   # what a run with cuda_graph=true installs
    for q in (True, False):
        with quant_enabled(model, q), torch.inference_mode():
            for c, ref in zip(calls, eager[q]):
                assert torch.equal(model(**c)[0], ref)
    assert graphed.captures == 4 and graphed.replays == 6       # batch 2 and 4, quantized and not
    assert not torch.equal(eager[True][0], eager[False][0])
    eager_forward(model)
    assert "forward" not in model.__dict__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device machine)")
def test_graphed_run_writes_the_eager_runs_images(run_tiny, tmp_path, monkeypatch):
    installed = []

    def recording(denoiser):
        installed.append(graph_denoiser(denoiser))
        return installed[-1]

    monkeypatch.setattr(runner, "graph_denoiser", recording)
    overrides = ["device=cuda", "quant=svdquant_w4a4", "++quant.calib_prompts=2", "corrector=all"]
    eager, eager_dir = run_tiny(overrides, cache=tmp_path / "cache_eager")
    assert installed == []
    graphed, graphed_dir = run_tiny([*overrides, "cuda_graph=true"], cache=tmp_path / "cache_graph")
    assert len(installed) == 1 and installed[0].replays > installed[0].captures > 0
    assert set(graphed["variants"]) == {"fp", "quant", "qdrift", "qdrift_exact", "ptqd", "d2dpm", "d2dpm_stochastic", "cumcomp"}
    for variant in graphed["variants"]:
        pngs = sorted((eager_dir / "images" / variant).glob("*.png"))
        assert len(pngs) == 4
        for png in pngs:
            assert (graphed_dir / "images" / variant / png.name).read_bytes() == png.read_bytes(), (variant, png)
    assert graphed["variants"] == eager["variants"]
