"""The saved quantized state: NVFP4 code packing on any device, weight digests, safe concurrent writes."""
from __future__ import annotations

import os
import re
import threading

import pytest
import torch

from qdrift.models.tiny import tiny_pixart
from qdrift.quant import (
    QuantSpec, QuantStateMismatch, fake_quant_layers, load_quant_state, quantize, read_header, save_quant_state,
)
from qdrift.quant.calib import replay_calibrator
from qdrift.quant.spec import QuantizerSpec
from qdrift.quant.state import FORMAT_VERSION, pack_codes, unpack_codes

pytestmark = pytest.mark.usefixtures("one_thread")

NVFP4 = QuantizerSpec(4, "nvfp4", "group", 16)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")


def test_nvfp4_codes_pack_and_unpack_on_the_cpu():
    """Every E2M1 code (2x the value: 0, +-1, ..., +-12), both nibble positions."""
    values = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12], dtype=torch.int8)
    codes = torch.cat([values, -values[1:], values.flip(0), -values[1:].flip(0)]).reshape(2, 15)
    packed = pack_codes(codes, NVFP4)
    assert packed.dtype == torch.uint8 and packed.numel() == 15 and packed.device.type == "cpu"
    assert torch.equal(unpack_codes(packed, NVFP4, codes.shape), codes)
    odd = codes[:, :7]                                 # an odd count stays int8
    assert torch.equal(unpack_codes(pack_codes(odd, NVFP4), NVFP4, odd.shape), odd)


@CUDA
def test_nvfp4_codes_pack_from_cuda():
    codes = torch.tensor([0, 1, -1, 3, -12, 12, 6, -8], dtype=torch.int8, device="cuda")
    packed = pack_codes(codes, NVFP4)
    assert packed.device.type == "cpu"
    assert torch.equal(unpack_codes(packed, NVFP4, codes.shape), codes.cpu())


def _inputs(cfg, gen, device, batch=2):
    return dict(hidden_states=torch.randn(batch, cfg.in_channels, 16, 16, generator=gen).to(device),
                encoder_hidden_states=torch.randn(batch, 8, cfg.caption_channels, generator=gen).to(device),
                timestep=torch.randint(0, 1000, (batch,), generator=gen).to(device),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def _spec(method: str = "svdquant_nvfp4") -> QuantSpec:
    if method == "rtn_w4a8":
        return QuantSpec.from_config(dict(name=method, method="rtn", w_bits=4, a_bits=8, calib_prompts=1))
    return QuantSpec.from_config(dict(name=method, method="svdquant", format="nvfp4", w_bits=4, a_bits=4, rank=4,
                                      alpha_grid=4, lowrank_iters=1, calib_tokens=64, calib_prompts=1))


def _quantized(device: str, method: str = "svdquant_nvfp4"):
    """A tiny PixArt transformer quantized on `device`, and a call to compare outputs on."""
    torch.manual_seed(0)
    model = tiny_pixart().transformer.to(device).eval()
    call = _inputs(model.config, torch.Generator().manual_seed(0), device)
    quantize(model, _spec(method), "pixart", replay_calibrator(model, [((), call)]), progress=False)
    return model, call


def _fresh(device: str):
    torch.manual_seed(0)
    return tiny_pixart().transformer.to(device).eval()


def _out(model, call):
    with torch.no_grad():
        return model(**call)[0].clone()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_nvfp4_state_saves_and_loads_bit_identically(tmp_path, device):
    model, call = _quantized(device)
    path = save_quant_state(model, tmp_path / "q.safetensors")
    header = read_header(path)
    assert header["version"] == FORMAT_VERSION == 2
    assert all(len(meta["digest"]) == 32 for meta in header["layers"].values())
    fresh = _fresh(device)
    load_quant_state(fresh, _spec(), "pixart", path)
    assert torch.equal(_out(fresh, call), _out(model, call))
    if device == "cuda":                                  # the state of a CUDA model loads onto a CPU one too
        load_quant_state(_fresh("cpu"), _spec(), "pixart", path)


def test_load_refuses_other_weights_before_replacing_anything(tmp_path):
    model, _ = _quantized("cpu", "rtn_w4a8")
    path = save_quant_state(model, tmp_path / "q.safetensors")
    fresh = _fresh("cpu")
    name = "transformer_blocks.1.ff.net.2"
    with torch.no_grad():
        fresh.get_submodule(name).bias[3] += 1e-3        # one number of one bias
    with pytest.raises(QuantStateMismatch, match=rf"{re.escape(str(path))}: .*layer {re.escape(name)} "):
        load_quant_state(fresh, _spec("rtn_w4a8"), "pixart", path)
    assert not list(fake_quant_layers(fresh)) and not hasattr(fresh, "_qdrift_quant")
    assert issubclass(QuantStateMismatch, ValueError)


def test_writes_use_private_temp_files_and_the_umask(tmp_path):
    model, _ = _quantized("cpu", "rtn_w4a8")
    target = tmp_path / "q.safetensors"
    old = os.umask(0o027)
    try:
        errors = []

        def write():
            try:
                save_quant_state(model, target)
            except Exception as e:  # noqa: BLE001 - collected for the assertion below
                errors.append(e)

        threads = [threading.Thread(target=write) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.umask(old)
    assert not errors
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]    # no temp file left behind
    assert target.stat().st_mode & 0o777 == 0o640
    load_quant_state(_fresh("cpu"), _spec("rtn_w4a8"), "pixart", target)
