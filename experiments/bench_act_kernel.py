"""Time of the fused activation fake-quant kernel against the columns each program covers (one GPU).

    python experiments/bench_act_kernel.py                      # 8192 tokens x 1152 / 4608 channels, FP16

`qdrift/quant/triton_kernels.py` gives each program at least `_MIN_COLS` columns (several quantization
groups of one token row). This prints, for SVDQuant's INT4 (groups of 64) and NVFP4 (groups of 16)
activation quantizers with smoothing and X' written out (as in a layer with a low-rank branch), the
kernel time per setting next to a plain copy of the tensor, and checks every setting gives the same output.
"""
from __future__ import annotations

import argparse
import functools

import torch
import triton.testing

from qdrift.quant import triton_kernels
from qdrift.quant.spec import QuantizerSpec


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="rows (PixArt at 1024 px, batch 2: 8192)")
    p.add_argument("--channels", type=int, nargs="+", default=[1152, 4608])
    p.add_argument("--min-cols", type=int, nargs="+", default=[16, 64, 128, 256])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    specs = {"int4 (g64)": (QuantizerSpec(4), None),
             "nvfp4 (g16)": (QuantizerSpec(4, "nvfp4", "group", 16), torch.tensor(40.0, device="cuda"))}
    default = triton_kernels._MIN_COLS
    print(f"{torch.cuda.get_device_name()}, FP16, {args.tokens} tokens; default min columns {default}")
    print("| channels | quantizer | min columns | columns per program | kernel (us) |")
    print("|---|---|---|---|---|")
    try:
        for c in args.channels:
            x = torch.randn(args.tokens, c, device="cuda", dtype=torch.float16)
            smooth = torch.rand(c, device="cuda", dtype=torch.float16) + 0.5
            print(f"| {c} | copy | - | - | {1e3 * triton.testing.do_bench(x.clone):.1f} |")
            for name, (spec, hi) in specs.items():
                outs = []
                for cols in args.min_cols:
                    triton_kernels._MIN_COLS = cols
                    call = functools.partial(triton_kernels.group_fake_quant, x, spec, 0.0, smooth, True, hi)
                    outs.append(call()[1])
                    block = triton_kernels.columns_per_program(c, spec.group_size)
                    print(f"| {c} | {name} | {cols} | {block} | {1e3 * triton.testing.do_bench(call):.1f} |")
                if not all(torch.equal(o, outs[0]) for o in outs):
                    raise SystemExit(f"error: {name} outputs differ between column settings")
    finally:
        triton_kernels._MIN_COLS = default


if __name__ == "__main__":
    main()
