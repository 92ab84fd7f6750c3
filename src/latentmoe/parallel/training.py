"""The trainer's plan: the hooks the training loop calls, for one plain process or for many.

`training_plan` picks one. `SingleProcess` does the one-process thing at every hook, so the loop
reads the same either way. Launched by torchrun, `TrainParallel` joins the process group and every
rank runs the same loop: a step's micro-batches are numbered globally and rank r takes
micro-batches r, r+W, r+2W, ... of the same sequence a single process would draw, each scaled by
1/(all micro-batches), so the step (and a resume on any number of ranks) sees the same data and
the same summed gradient as one process would.
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist

from ..checkpoint.training import load_checkpoint, save_checkpoint
from .data_parallel import ZeroOptimizer, clip_grad_norm, sync_gradients
from .expert_parallel import apply_expert_parallel
from .mesh import ParallelDims, destroy_parallel, init_parallel, launched_by_torchrun


class TrainPlan:
    """What every plan shares: where this process sits (`dims`) and the checkpoints, which every
    rank saves and loads collectively (one process is the world of one)."""

    dims: ParallelDims

    @property
    def device(self) -> torch.device:
        return self.dims.device

    @property
    def is_main(self) -> bool:
        return self.dims.is_main

    def barrier(self) -> None:
        self.dims.barrier()

    def save(self, run_dir, model, optimizer, trainer_state, save_config, tokenizer_dir, keep) -> str:
        return save_checkpoint(run_dir, model, optimizer, trainer_state, self.dims, save_config, tokenizer_dir, keep)

    def load(self, path, model, optimizer) -> dict:
        return load_checkpoint(path, model, optimizer, self.dims)


class SingleProcess(TrainPlan):
    """One plain process: the model as built, the optimizer as built, every micro-batch here."""

    def __init__(self, device: torch.device):
        self.dims = ParallelDims(device=device)

    def apply(self, model, cfg):
        return model

    def wrap_optimizer(self, optimizer, model):
        return optimizer

    def micro_batches(self, accum: int) -> range:
        return range(accum)

    def reduce_metrics(self, parts: dict, loads, kept, n_assign: int):
        return parts, loads, kept, n_assign

    def clip_gradients(self, model, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    def agree(self, values: list[float]) -> list[float]:
        return values


class TrainParallel(TrainPlan):
    """Expert parallelism over the EP ranks of the mesh, ZeRO-1 (or replicated optimizer state) over the rest."""

    def __init__(self, dims: ParallelDims, zero1: bool = True):
        self.dims, self.zero1 = dims, zero1

    @classmethod
    def from_config(cls, cfg, device: torch.device) -> "TrainParallel":
        """Join torchrun's process group per [parallel]."""
        p = cfg.parallel
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
        n = torch.tensor(float(n_assign), device=kept.device)
        flat = torch.stack([parts[k].float() for k in keys] + [kept.float(), n])
        dist.all_reduce(flat)
        for i, k in enumerate(keys):
            parts[k] = flat[i]
        if loads is not None:
            dist.all_reduce(loads)  # every rank counts the full E choices of its own tokens
        return parts, loads, flat[-2], int(flat[-1].item())

    def clip_gradients(self, model, max_norm: float) -> torch.Tensor:
        sync_gradients(model, self.dims)
        return clip_grad_norm(model, self.dims, max_norm if max_norm > 0 else float("inf"))

    def agree(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank: clocks differ between ranks, decisions taken from them must not."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()


class _Replicated:
    """Every rank steps every tensor (gradients are already summed): the optimizer without ZeRO-1."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.optimizer, name)

    def owns(self, p) -> bool:
        return True


def training_plan(cfg, device: torch.device) -> TrainPlan:
    """TrainParallel when torchrun started more than one process, else SingleProcess."""
    if launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return TrainParallel.from_config(cfg, device)
    if cfg.parallel.ep_size != 1:
        raise ValueError(f"parallel.ep_size = {cfg.parallel.ep_size} needs that many processes: launch with "
                         f"`torchrun --nproc-per-node {cfg.parallel.ep_size} -m latentmoe train ...`")
    return SingleProcess(device)


__all__ = ["TrainPlan", "SingleProcess", "TrainParallel", "training_plan"]
