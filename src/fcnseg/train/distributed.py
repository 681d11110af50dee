"""PyTorch's own distributed stack: set up from torchrun's environment, gloo on CPU, NCCL on GPUs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..hardware import pick_device


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over processes (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, shared with every process (e.g. 'the time budget is spent')."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def elastic_restarts(info: DistInfo) -> int:
    """How many times torchrun's elastic agents restarted this job: the largest ``TORCHELASTIC_RESTART_COUNT``
    over the processes (an agent whose own worker did not fail may count fewer), the same on every rank; 0
    outside torchrun."""
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not info.enabled or not (dist.is_available() and dist.is_initialized()):
        return count
    t = torch.tensor([count], dtype=torch.int64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def record_elastic(out: str | os.PathLike, info: DistInfo, restarts: int) -> None:
    """Rank 0 of a torchrun launch writes ``OUT/elastic.json``: the restarts so far (rewritten at each start),
    the world size and torchrun's run id and restart limit, so the run directory says how it was run."""
    if not info.main or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return
    import json
    from pathlib import Path

    from ..files import atomic_write

    record = dict(restarts=restarts, world_size=info.world, run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
                  max_restarts=int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0))
    atomic_write(Path(out) / "elastic.json", lambda tmp: Path(tmp).write_text(json.dumps(record) + "\n"))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
