"""The fused CUDA kernels compute the same quantizer as the reference (run in Triton's CPU interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    from qdrift.quant import triton_kernels as tk
    from qdrift.quant.primitives import fake_quant_act
    from qdrift.quant.spec import QuantizerSpec
    torch.manual_seed(0)
    x = torch.randn(40, 128) * torch.rand(128) * 5
    smooth = torch.rand(128) + 0.5
    narrow = torch.randn(40, 48) * 3   # 48 columns, not a multiple of 128: one group per program
    nvfp4 = QuantizerSpec(4, "nvfp4", "group", 16)
    cases = [(QuantizerSpec(4), 0.0, None, x), (QuantizerSpec(3), 0.0, None, x), (QuantizerSpec(4), 0.171875, None, x),
             (nvfp4, 0.0, None, x), (nvfp4, 0.0, torch.tensor(40.0), x),
             (nvfp4, 0.0, None, narrow), (QuantizerSpec(4, group_size=16), 0.0, None, narrow)]
    for spec, shift, hi, xin in cases:
        sm = smooth[: xin.shape[1]]
        xs, xq = tk.group_fake_quant(xin, spec, shift, sm, True, hi)
        ref_xs = (xin + shift) * sm
        assert torch.equal(xs, ref_xs), spec
        assert torch.equal(xq, fake_quant_act(ref_xs, spec, shift > 0, hi=hi)), (spec, shift)
    spec = QuantizerSpec(8, "int", "tensor", symmetric=False, dynamic=False)
    lo, hi = torch.tensor(-3.0), torch.tensor(5.0)
    assert torch.equal(tk.tensor_fake_quant(x, spec, lo, hi), fake_quant_act(x, spec, False, lo, hi))
    print("ok")
""")


def test_triton_kernels_match_the_reference_quantizer():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
