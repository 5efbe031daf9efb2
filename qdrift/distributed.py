"""One run over several processes started by torchrun: who does what, and waiting for each other.

`torchrun --nproc_per_node=N run.py ...` starts N copies of the run. They split the work that
dominates (calibration blocks, every variant's image batches, feature extraction) by index and hand
their results over through the cache and the run directory, never through collectives. An image is
therefore the same computation, and the same bytes, whatever N is, and a rank that dies loses
nothing already cached. Rank 0 quantizes first (the others then read its cached state) and alone
writes metrics, tables and W&B. Collectives carry only barriers and the run's name, on the CPU
(gloo); on GPUs the group also has NCCL, bound to each rank's device.

torchrun, not `accelerate launch`: the run needs a rank, a world size and a barrier, which torch
ships; accelerate would add a dependency whose value (mixed precision, DDP wrapping, gradient
syncing) is for training. Several nodes: the same command under `srun` (README, "Many GPUs").
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_ENV = "QDRIFT_DIST_TIMEOUT_MIN"   # how long a rank waits for the others at a barrier


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from torchrun's environment (a plain process is rank 0 of 1)."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as err:
        raise RuntimeError(f"RANK / WORLD_SIZE / LOCAL_RANK are not integers: {err}") from None


def _timeout() -> datetime.timedelta:
    # Long by default: a rank waits at a barrier while another quantizes a 12B model or evaluates.
    value = os.environ.get(TIMEOUT_ENV, "360")
    try:
        return datetime.timedelta(minutes=float(value))
    except ValueError:
        raise SystemExit(f"error: {TIMEOUT_ENV}={value!r} is not a number of minutes") from None


def init() -> World:
    """Join torchrun's process group (once, before Hydra names the run directory); a no-op alone."""
    w = world()
    if not w.distributed or dist.is_initialized():
        return w
    if torch.cuda.is_available():
        torch.cuda.set_device(w.local_rank % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=_timeout())
    else:
        dist.init_process_group("gloo", timeout=_timeout())
    return w


def barrier() -> None:
    """Wait for every rank (a CPU all-reduce, so it runs on gloo whatever the device)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(torch.zeros(1))


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: list) -> list:
    """This rank's share of `items`: every size-th item from its rank (the same split on every rank)."""
    w = world()
    return list(items)[w.rank::w.size]


@contextmanager
def main_first():
    """Rank 0 runs the block first (it builds what the block caches); the others run it afterwards and
    so only read. A failure on rank 0 ends the job: torchrun stops the other ranks."""
    w = world()
    if not w.is_main:
        barrier()
    yield
    if w.is_main:
        barrier()


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
