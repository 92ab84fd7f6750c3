"""The trainer's hooks into parallelism: one object the training loop calls at five points.

Launched by torchrun, every rank runs the same loop. A step's micro-batches are numbered
globally and rank r takes micro-batches r, r+W, r+2W, ... of the same sequence a single process
would draw, each scaled by 1/(all micro-batches), so the step (and a resume on any number of
ranks) sees the same data and the same summed gradient as one process would.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint_distributed, save_checkpoint_distributed
from .data_parallel import ZeroOptimizer, clip_grad_norm, sync_gradients
from .expert_parallel import apply_expert_parallel
from .mesh import ParallelDims, barrier, destroy_parallel, init_parallel, launched_by_torchrun


class TrainParallel:
    """ParallelDims plus what the trainer needs from it; None stands for one plain process."""

    def __init__(self, dims: ParallelDims, zero1: bool = True):
        self.dims, self.zero1 = dims, zero1

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "TrainParallel | None":
        """Join torchrun's process group per [parallel]; None when this is a single process."""
        p = cfg.parallel
        if not launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            if p.ep_size != 1:
                raise ValueError(f"parallel.ep_size = {p.ep_size} needs that many processes: launch with "
                                 f"`torchrun --nproc-per-node {p.ep_size} -m latentmoe train ...`")
            return None
        if p.dp_shard not in (0, 1):
            raise ValueError(f"parallel.dp_shard = {p.dp_shard}: 1 shards the optimizer state over replicas "
                             "(ZeRO-1), 0 replicates it")
        t, world = cfg.train, int(os.environ["WORLD_SIZE"])
        for bs in {t.batch_size, t.batch_size_start or t.batch_size}:
            if (bs // t.micro_batch_size) % world:
                raise ValueError(f"{world} ranks share each step's micro-batches: train.batch_size (and "
                                 f"batch_size_start) / train.micro_batch_size must be a multiple of {world} "
                                 f"(got {bs} / {t.micro_batch_size})")
        dims = init_parallel(p.ep_size, device)
        atexit.register(destroy_parallel)
        r = cfg.routing
        if dims.ep_size > 1 and (r.devices, r.max_devices) != (dims.ep_size, min(r.max_devices, dims.ep_size)):
            # Under expert parallelism a routing "device" is an EP rank: D is the EP size.
            if dims.is_main:
                print(f"expert parallelism: routing.devices {r.devices} -> {dims.ep_size} (the EP ranks), "
                      f"routing.max_devices {r.max_devices} -> {min(r.max_devices, dims.ep_size)}")
            r.devices, r.max_devices = dims.ep_size, min(r.max_devices, dims.ep_size)
        return cls(dims, zero1=bool(p.dp_shard))

    # ---- setup
    @property
    def device(self) -> torch.device:
        return self.dims.device

    @property
    def is_main(self) -> bool:
        return self.dims.is_main

    def barrier(self) -> None:
        barrier(self.dims)

    def apply(self, model, cfg):
        """Expert parallelism on the built (full, identically seeded) model; device-limited routing over real ranks."""
        r = cfg.routing
        apply_expert_parallel(model, self.dims.ep_group, self.dims.ep_rank, self.dims.ep_size,
                              r.max_devices if r.device_limited else None)
        return model

    def wrap_optimizer(self, optimizer, model):
        return ZeroOptimizer(optimizer, model, self.dims) if self.zero1 else _Replicated(optimizer)

    # ---- step
    def micro_batches(self, accum: int) -> range:
        W = self.dims.world_size
        if accum % W:
            raise ValueError(f"a step of {accum} micro-batches cannot be split over {W} ranks: make "
                             f"train.batch_size / train.micro_batch_size (and the ramp's sizes) a multiple of {W}")
        return range(self.dims.rank, accum, W)

    @torch.no_grad()
    def reduce_metrics(self, parts: dict, loads, kept, n_assign: int):
        """Sum the step's metric parts over all ranks (each rank holds its micro-batches' share)."""
        keys = list(parts)
        flat = torch.stack([parts[k].float() for k in keys] + [kept.float(), torch.tensor(float(n_assign), device=kept.device)])
        dist.all_reduce(flat)
        for i, k in enumerate(keys):
            parts[k] = flat[i]
        if loads is not None:
            dist.all_reduce(loads)  # every rank counts the full E choices of its own tokens
        return parts, loads, flat[-2], int(flat[-1].item())

    def clip_gradients(self, model, max_norm: float) -> torch.Tensor:
        sync_gradients(model, self.dims)
        return clip_grad_norm(model, self.dims, max_norm if max_norm > 0 else float("inf"))

    # ---- checkpoints
    def save(self, run_dir, model, optimizer, trainer_state, save_config, tokenizer_dir, keep, point_latest=None) -> str:
        return save_checkpoint_distributed(run_dir, model, optimizer, trainer_state, self.dims, save_config,
                                           tokenizer_dir, keep, point_latest)

    def load(self, path, model, optimizer) -> dict:
        return load_checkpoint_distributed(path, model, optimizer, self.dims)


class _Replicated:
    """Every rank steps every tensor (gradients are already summed): the optimizer without ZeRO-1."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def owns(self, p) -> bool:
        return True


__all__ = ["TrainParallel"]
