"""A resumable, time-budgeted training loop: AdamW + warm-up + EMA, checkpointed to one file.

The loop stops by itself when the stage's own training time (summed over invocations) or step cap is
reached, or when the invocation's wall-clock budget runs low; it then saves model, EMA, optimizer,
RNG state and step, so the next invocation continues the identical trajectory. The learning rate is
constant after warm-up, so where an invocation stops does not change the schedule.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StagePlan:
    minutes: float          # training-loop time for the stage, summed over invocations
    max_steps: int          # hard cap (reproducible runs: set it and minutes=inf)
    batch_size: int
    lr: float
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    log_every: int = 100
    checkpoint_minutes: float = 2.0
    bf16: bool = True       # bf16 autocast on CUDA (ignored on CPU, which trains in fp32)


class Budget:
    """The invocation's wall-clock budget, counted from process start."""

    def __init__(self, minutes: float, start: float):
        self.deadline = start + 60 * minutes
        self.start = start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def used_minutes(self) -> float:
        return (time.monotonic() - self.start) / 60


class EMA:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up of the decay."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in params], 1 - d)

    @torch.no_grad()
    def copy_to(self, params: list[torch.Tensor]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s.to(p.dtype))


class StageRun:
    """Trains `modules` with `loss_fn(gen) -> loss`, resumable from `checkpoint`."""

    def __init__(self, name: str, modules: dict[str, torch.nn.Module], plan: StagePlan, device: torch.device,
                 seed: int, checkpoint: Path, log: Callable[[str], None] = print):
        self.name, self.modules, self.plan, self.device = name, modules, plan, device
        self.checkpoint, self.log = checkpoint, log
        self.params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=plan.lr, betas=(0.9, 0.99), weight_decay=plan.weight_decay,
                                     fused=fused)
        self.ema = EMA(self.params, plan.ema_decay)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.step, self.elapsed, self.history = 0, 0.0, []      # history: (step, mean loss) per log interval
        if checkpoint.is_file():
            self._load()
            self.log(f"[{name}] resumed at step {self.step} ({self.elapsed / 60:.2f} min trained)")

    def finished(self) -> bool:
        return self.step >= self.plan.max_steps or self.elapsed >= 60 * self.plan.minutes

    def run(self, loss_fn: Callable[[torch.Generator], torch.Tensor], budget: Budget, reserve_s: float) -> bool:
        """Train until finished (True) or until the invocation budget minus `reserve_s` is spent (False)."""
        for m in self.modules.values():
            m.train()
        cuda = self.device.type == "cuda"
        amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.plan.bf16) if cuda \
            else torch.autocast("cpu", enabled=False)
        loss_sum, n_sum = torch.zeros((), device=self.device), 0
        # A finite loss with non-finite gradients (e.g. a bf16 overflow in backward) leaves NaN weights.
        nonfinite_grads = torch.zeros((), dtype=torch.bool, device=self.device)
        last_log = last_ckpt = time.monotonic()
        steps_at_log = self.step
        while not self.finished():
            if budget.left() < reserve_s:
                self.save()
                self.log(f"[{self.name}] invocation budget spent at step {self.step}: "
                         f"checkpointed to {self.checkpoint}")
                return False
            t0 = time.monotonic()
            for g in self.opt.param_groups:
                g["lr"] = self.plan.lr * min(1.0, (self.step + 1) / self.plan.warmup)
            with amp:
                loss = loss_fn(self.gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            nonfinite_grads |= ~torch.isfinite(torch.nn.utils.clip_grad_norm_(self.params, self.plan.grad_clip))
            self.opt.step()
            self.ema.update(self.params, self.step)
            self.step += 1
            loss_sum += loss.detach().float()
            n_sum += 1
            self.elapsed += time.monotonic() - t0
            if self.step % self.plan.log_every == 0 or self.finished():
                mean = (loss_sum / n_sum).item()                  # host syncs only at log intervals
                if not math.isfinite(mean) or nonfinite_grads.item():
                    what = f"loss is {mean}" if not math.isfinite(mean) else "gradients are not finite"
                    raise FloatingPointError(f"[{self.name}] {what} at step {self.step}: training diverged "
                                             f"(nothing exported; see the stage's plan in train_bench.py)")
                now = time.monotonic()
                rate = (self.step - steps_at_log) / max(now - last_log, 1e-9)
                self.history.append((self.step, mean))
                self.log(f"[{self.name}] step {self.step} loss {mean:.4f} {rate:.1f} steps/s "
                         f"trained {self.elapsed / 60:.2f}/{self.plan.minutes:g} min, "
                         f"invocation {budget.used_minutes():.2f} min")
                loss_sum.zero_()
                n_sum, last_log, steps_at_log = 0, now, self.step
            if time.monotonic() - last_ckpt > 60 * self.plan.checkpoint_minutes:
                self.save()
                last_ckpt = time.monotonic()
        return True

    def ema_modules(self) -> dict[str, torch.nn.Module]:
        """The modules with EMA weights swapped in (in place: call at the end of the stage)."""
        self.ema.copy_to(self.params)
        for m in self.modules.values():
            m.eval()
        return self.modules

    def save(self) -> None:
        state = {
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "opt": self.opt.state_dict(), "ema": self.ema.shadow, "gen": self.gen.get_state(),
            "step": self.step, "elapsed": self.elapsed, "history": self.history,
        }
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint)

    def _load(self) -> None:
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k])
        self.opt.load_state_dict(state["opt"])
        self.ema.shadow = [s.to(self.device) for s in state["ema"]]
        self.gen.set_state(state["gen"].cpu())
        self.step, self.elapsed, self.history = state["step"], state["elapsed"], [tuple(h) for h in state["history"]]

    def discard_checkpoint(self) -> None:
        self.checkpoint.unlink(missing_ok=True)


def param_count(modules: dict[str, torch.nn.Module]) -> int:
    return sum(p.numel() for m in modules.values() for p in m.parameters())

