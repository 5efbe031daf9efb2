"""Probe: are quantization errors correlated across steps of one run? Saves e at every step."""
import sys, torch
from qdrift.drift import calibration
from qdrift.drift.layout import by_channel
store = {}
orig = calibration.PairedAccumulator.add
def add(self, i, u_quant, u_fp):
    u = by_channel(u_quant.detach().double(), self.layout); e = u - by_channel(u_fp.detach().double(), self.layout)
    store.setdefault(i, []).append(torch.stack([u, e]).float().cpu())
    return orig(self, i, u_quant, u_fp)
calibration.PairedAccumulator.add = add
from qdrift.app import main
out = sys.argv.pop(1)
try:
    main()
finally:
    torch.save({i: torch.cat(v, 1) for i, v in store.items()}, out)
