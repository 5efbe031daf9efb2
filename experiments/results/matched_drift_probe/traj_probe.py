"""Probe: per-step per-channel latent mean/var of each variant's trajectory (generate stage)."""
import sys, torch
from qdrift.stages import generate
from qdrift.drift.hooks import StepHook
from qdrift.drift.layout import by_channel
rec = {}
class Rec(StepHook):
    def __init__(self, inner, name): self.inner, self.name = inner, name
    def prepare(self, s):
        if self.inner is not None: self.inner.prepare(s)
    def step(self, scheduler, i, mo, sample, parent, kw):
        x = by_channel(sample.double(), "image")
        rec.setdefault(self.name, {}).setdefault(i, []).append(x.cpu().float())
        out = self.inner.step(scheduler, i, mo, sample, parent, kw) if self.inner is not None else parent(mo).prev_sample
        if i == scheduler.num_inference_steps - 1 if hasattr(scheduler, "num_inference_steps") else False:
            rec[self.name].setdefault(i + 1, []).append(by_channel(out.double(), "image").cpu().float())
        return out
orig_wrap, orig_for = generate.wrap_scheduler, generate.corrector_for
cur = {}
def corrector_for(ctx, name, spec, pool):
    cur["name"] = name; return orig_for(ctx, name, spec, pool)
def wrap(base, hook):
    return orig_wrap(base, Rec(hook, cur.get("name") if hook is not None else ("quant" if "quant" in rec or "fp" in rec else "fp")))
generate.corrector_for, generate.wrap_scheduler = corrector_for, wrap
from qdrift.app import main
out = sys.argv.pop(1)
try:
    main()
finally:
    torch.save({n: {i: torch.cat(v) for i, v in d.items()} for n, d in rec.items()}, out)
