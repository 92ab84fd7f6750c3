"""Data parallelism composed with expert parallelism: gradient sync, global-norm clipping, ZeRO-1.

Replicas of a tensor: everything outside the routed experts lives on all ranks; an expert slice
lives on the `dp` ranks of its mesh column. Each rank scales its loss by 1/(micro-batches of the
whole step, all ranks together), so SUMMING gradients over a tensor's replicas gives exactly the
single-process gradient. ZeRO-1 (the report's choice): gradients and weights stay whole, the
AdamW state of each tensor lives only on the replica that owns it; the owner updates the tensor
and broadcasts it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .expert_parallel import is_expert_param
from .mesh import ParallelDims


def _split_params(model) -> tuple[list[tuple[str, torch.nn.Parameter]], list[tuple[str, torch.nn.Parameter]]]:
    dense, expert = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (expert if is_expert_param(name) and getattr(_owner_module(model, name), "is_expert_parallel", False)
             else dense).append((name, p))
    return dense, expert


def _owner_module(model, name: str):
    return model.get_submodule(name.rsplit(".", 1)[0])


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    """Sum in place over `group`, one collective per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = _flatten_dense_tensors(ts)
        dist.all_reduce(flat, group=group)
        for t, synced in zip(ts, _unflatten_dense_tensors(flat, ts)):
            t.copy_(synced)


@torch.no_grad()
def sync_gradients(model, dims: ParallelDims) -> None:
    """Sum each gradient over the ranks that hold a replica of its tensor (missing grads count as 0)."""
    if not dims.distributed:
        return
    dense, expert = _split_params(model)
    for params, group in ((dense, dims.world_group), (expert, dims.dp_group)):
        if group is None or not params:
            continue
        for _, p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        _all_reduce_coalesced([p.grad for _, p in params], group)


@torch.no_grad()
def global_grad_norm(model, dims: ParallelDims) -> torch.Tensor:
    """L2 norm of the whole model's gradient: replicated tensors once, every expert slice once."""
    dense, expert = _split_params(model)
    dev = next(model.parameters()).device
    sq_dense = torch.zeros((), device=dev, dtype=torch.float32)
    sq_expert = torch.zeros((), device=dev, dtype=torch.float32)
    for _, p in dense:
        if p.grad is not None:
            sq_dense += p.grad.float().pow(2).sum()
    for _, p in expert:
        if p.grad is not None:
            sq_expert += p.grad.float().pow(2).sum()
    if dims.ep_group is not None:
        dist.all_reduce(sq_expert, group=dims.ep_group)  # the slices of one layer live on the EP row
    return (sq_dense + sq_expert).sqrt()


@torch.no_grad()
def clip_grad_norm(model, dims: ParallelDims, max_norm: float) -> torch.Tensor:
    """Clip all gradients by the global norm (same coefficient on every rank); returns the norm."""
    norm = global_grad_norm(model, dims)
    if max_norm > 0 and max_norm != float("inf"):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
    return norm


class ZeroOptimizer:
    """ZeRO-1 around any torch optimizer: each tensor is stepped (and has state) on one replica only.

    The inner optimizer keeps the trainer's param groups and LR handling; before its step the
    gradients of tensors this rank does not own are set to None (torch optimizers skip those and
    never create state for them), after it each owner broadcasts its updated tensors.
    Ownership balances element counts greedily within each replica group.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model, dims: ParallelDims):
        self.optimizer, self.dims = optimizer, dims
        dense, expert = _split_params(model)
        self.buckets: list[tuple[list, object, int]] = []  # (params owned by `src`, group, global src rank)
        self.mine: dict[torch.nn.Parameter, bool] = {}
        # Per replica group: (tensors, group, its size, this rank's index in it, index -> global rank).
        plans = [(dense, dims.world_group, dims.world_size, dims.rank, lambda i: i),
                 (expert, dims.dp_group, dims.dp_size, dims.dp_rank, lambda i: i * dims.ep_size + dims.ep_rank)]
        for params, group, size, me, to_global in plans:
            load = [0] * size
            owned: list[list] = [[] for _ in range(size)]
            for _, p in sorted(params, key=lambda np_: -np_[1].numel()):  # big first: better balance
                i = min(range(size), key=lambda j: load[j])
                load[i] += p.numel()
                owned[i].append(p)
                self.mine[p] = i == me
            if size > 1:
                for i in range(size):
                    if owned[i]:
                        self.buckets.append((owned[i], group, to_global(i)))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def owns(self, p: torch.nn.Parameter) -> bool:
        return self.mine.get(p, True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if not self.owns(p):
                    p.grad = None
        self.optimizer.step()
        for params, group, src in self.buckets:
            by_dtype: dict[torch.dtype, list] = {}
            for p in params:
                by_dtype.setdefault(p.dtype, []).append(p.data)
            for ts in by_dtype.values():
                flat = _flatten_dense_tensors(ts)
                dist.broadcast(flat, src=src, group=group)
                for t, new in zip(ts, _unflatten_dense_tensors(flat, ts)):
                    t.copy_(new)


__all__ = ["sync_gradients", "global_grad_norm", "clip_grad_norm", "ZeroOptimizer"]
