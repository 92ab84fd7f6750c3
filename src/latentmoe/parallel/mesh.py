"""Process group and device mesh from the torchrun environment: NCCL on GPUs, gloo on CPU.

The mesh has two dimensions, ("dp", "ep"): ranks of one "ep" row share the routed experts of
every MoE layer between them (each holds 1/ep of them); ranks of one "dp" column hold the same
expert slice and average its gradients. Everything outside the routed experts is replicated on
all ranks. The model itself never reads rank or world size: it gets them from `ParallelDims`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelDims:
    """Where this process sits: world = dp * ep, rank = dp_rank * ep + ep_rank."""
    world_size: int = 1
    rank: int = 0
    ep_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh when distributed

    @property
    def dp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def ep_group(self):
        """Ranks that split the experts between them (None: no expert parallelism)."""
        return self.mesh.get_group("ep") if self.mesh is not None and self.ep_size > 1 else None

    @property
    def dp_group(self):
        """Ranks that hold the same expert slice (None: only this one)."""
        return self.mesh.get_group("dp") if self.mesh is not None and self.dp_size > 1 else None

    @property
    def world_group(self):
        return dist.group.WORLD if self.distributed else None

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if not self.distributed:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_parallel(ep_size: int = 1, device: str | torch.device | None = None,
                  timeout_s: float = 600.0) -> ParallelDims:
    """Join the process group described by the torchrun environment and build the mesh.

    Without torchrun (or with WORLD_SIZE=1) this returns a single-process ParallelDims and joins
    nothing. `device` None picks cuda:LOCAL_RANK when CUDA is available, else CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or str(device) == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if ep_size < 1 or world % ep_size:
        raise ValueError(f"parallel.ep_size = {ep_size} must be >= 1 and divide the number of processes ({world})")
    if world == 1:
        return ParallelDims(1, 0, 1, device, None)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL binds each process to its own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(device), timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return build_dims(ep_size, device)


def build_dims(ep_size: int, device: torch.device) -> ParallelDims:
    """ParallelDims over an already initialised process group."""
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep_size:
        raise ValueError(f"parallel.ep_size = {ep_size} must divide the number of processes ({world})")
    mesh = init_device_mesh(device.type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))
    return ParallelDims(world, rank, ep_size, device, mesh)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["ParallelDims", "init_parallel", "build_dims", "destroy_parallel", "backend_for",
           "launched_by_torchrun"]
