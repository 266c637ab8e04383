"""Window-parallel runs: one process per device (``torchrun``), windows split across processes.

Under ``torchrun`` (or any launcher that initialises ``torch.distributed``) every process loads the model
on its own device, builds its own activation cache, and works through every ``world``-th unfinished
window, appending to its own log in the shared run folder (``windows.rank<r>.jsonl`` /
``sweep.rank<r>.jsonl``). After a barrier, rank 0 reads all logs and writes the final outputs; a resumed
run reads every log, whatever the number of processes that wrote it. With one process nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")

__all__ = ["Shard", "current_shard", "init_from_environment"]


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes (``rank`` 0 writes the final outputs)."""

    rank: int = 0
    world: int = 1

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def take(self, items: list[T]) -> list[T]:
        """Every ``world``-th item, starting at ``rank`` (interleaved: windows of all widths on every process)."""
        return items[self.rank :: self.world]

    def log_name(self, stem: str) -> str:
        return f"{stem}.rank{self.rank}.jsonl" if self.parallel else f"{stem}.jsonl"

    def barrier(self) -> None:
        if self.parallel:
            import torch.distributed as dist

            dist.barrier()

    def on_rank0(self, action: Callable[[], T]) -> T:
        """Run ``action`` on rank 0 and share its result, or its one-line error, with every process (so a
        refused run folder stops all processes instead of leaving the others waiting)."""
        if not self.parallel:
            return action()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", action())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value


def current_shard() -> Shard:
    """The shard of this process: from ``torch.distributed`` when it is initialised, else a single process."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch builds without distributed
        return Shard()
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def init_from_environment(device: str) -> tuple[Shard, str]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): initialise the process group (NCCL for CUDA, else gloo) and
    return this process's shard and device (``cuda`` -> ``cuda:<LOCAL_RANK>``). Otherwise ``(Shard(), device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard(), device
    import torch
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return current_shard(), device
