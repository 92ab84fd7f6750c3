"""Training-time routing (report 2.2.2, 2.2.4): device-limited routing and device-level token dropping.

On one process the "devices" are D equal groups of experts; expert parallelism maps group d to
rank d, so the same rules hold. Both are switched on the built model from outside: the router's
`device_limit` and the MoE layer's `dropper` hook (which the model calls only in training mode).
"""

from __future__ import annotations

import math

import torch

from ..model import MoE


def drop_assignments(scores_ME: torch.Tensor, topk_idx_MK: torch.Tensor, devices: int,
                     capacity_factor: float = 1.0, protected_M: torch.Tensor | None = None) -> torch.Tensor:
    """Keep mask [M, K]: per device group, at most capacity = ceil(cf * M*K / D) assignments;
    over capacity the lowest-affinity ones go. Protected tokens are never dropped (and are
    served first, so they use up capacity before the rest)."""
    M, E = scores_ME.shape
    K = topk_idx_MK.shape[1]
    A = M * K
    capacity = math.ceil(capacity_factor * A / devices)
    aff_A = scores_ME.detach().gather(1, topk_idx_MK).flatten().float()
    dev_A = (topk_idx_MK // (E // devices)).flatten()
    prot_A = (protected_M.to(torch.bool).repeat_interleave(K) if protected_M is not None
              else torch.zeros(A, dtype=torch.bool, device=scores_ME.device))
    priority_A = aff_A + 2.0 * prot_A  # affinities are <= 1: protected first, then by affinity
    # Sort by priority (descending), then stably by device: each device's assignments in priority order.
    by_priority = priority_A.argsort(descending=True, stable=True)
    order = by_priority[dev_A[by_priority].argsort(stable=True)]
    dev_sorted = dev_A[order]
    # A scatter rather than torch.bincount, which syncs with the host on CUDA.
    counts_D = torch.zeros(devices, dtype=torch.int64, device=dev_sorted.device).scatter_add_(
        0, dev_sorted, torch.ones_like(dev_sorted))
    starts_D = counts_D.cumsum(0) - counts_D
    rank = torch.arange(A, device=scores_ME.device) - starts_D[dev_sorted]
    keep_sorted = (rank < capacity) | prot_A[order]
    keep_A = torch.empty_like(keep_sorted)
    keep_A[order] = keep_sorted
    return keep_A.view(M, K)


class DeviceDropper:
    """The `MoE.dropper` hook; `protected` [M] (tokens of the protected sequences) is set per micro-batch."""

    def __init__(self, devices: int, capacity_factor: float = 1.0):
        self.devices = devices
        self.capacity_factor = capacity_factor
        self.protected: torch.Tensor | None = None

    def __call__(self, scores, topk_idx, topk_weight):
        return drop_assignments(scores, topk_idx, self.devices, self.capacity_factor, self.protected)


def protected_tokens(batch: int, seq_len: int, fraction: float, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """[batch * seq_len] bool: every token of round(fraction * batch) randomly chosen sequences."""
    n = round(fraction * batch)
    seq = torch.zeros(batch, dtype=torch.bool)
    seq[torch.randperm(batch, generator=generator)[:n]] = True
    return seq.repeat_interleave(seq_len).to(device)


def configure_routing(model, rc) -> DeviceDropper | None:
    """Apply [routing]: device_limit=(D, M) on every router, a shared dropper on every MoE layer."""
    dropper = DeviceDropper(rc.devices, rc.capacity_factor) if rc.drop_tokens else None
    for module in model.modules():
        if isinstance(module, MoE):
            module.gate.device_limit = (rc.devices, rc.max_devices) if rc.device_limited else None
            module.dropper = dropper
    return dropper


def inference_config(cfg, rc):
    """The config to save: device-limited routing is V2's group_limited_greedy with n_group = D,
    topk_group = M, so inference routes exactly as training did (the released V2: 8 groups, 3)."""
    if not rc.device_limited or rc.devices == 1:
        return cfg
    if cfg.topk_method == "group_limited_greedy" and (cfg.n_group, cfg.topk_group) != (rc.devices, rc.max_devices):
        raise ValueError(f"routing.devices/max_devices ({rc.devices}, {rc.max_devices}) conflict with the model's "
                         f"group_limited_greedy n_group/topk_group ({cfg.n_group}, {cfg.topk_group})")
    return cfg.replace(topk_method="group_limited_greedy", n_group=rc.devices, topk_group=rc.max_devices)


__all__ = ["drop_assignments", "DeviceDropper", "protected_tokens", "configure_routing", "inference_config"]
