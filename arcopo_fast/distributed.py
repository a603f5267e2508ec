"""torch.distributed set-up for `torchrun`: NCCL on GPUs, gloo on CPU; DDP for LoRA, FSDP2 for full
fine-tuning. A plain `python -m arcopo_fast.train` runs as a world of one with no process group."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"run.device={name!r} but CUDA is not available")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def init(device_name: str) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes in the environment (if any) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local), device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is True on any (e.g. a Ctrl-C seen by one rank)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_model(model: torch.nn.Module, kind: str, info: DistInfo) -> torch.nn.Module:
    """The module the update's forward/backward goes through. Rollouts call the bare model.
    LoRA: DistributedDataParallel (small gradients, all-reduced during the backward).
    Full fine-tuning: FSDP2 `fully_shard` on every block, then on the root."""
    if not info.enabled:
        return model
    if kind == "lora":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # device_ids=None: inputs (caches, cross-attention K/V) are already on the module's device.
        return DDP(model, device_ids=None, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in model.blocks:
        fully_shard(block)
        register_fsdp_forward_method(block, "cross_kv")
    fully_shard(model)
    register_fsdp_forward_method(model, "encode_text")
    return model
