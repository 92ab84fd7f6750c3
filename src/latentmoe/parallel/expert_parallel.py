"""Expert parallelism for training: routed experts split over the EP ranks, tokens moved by all-to-all.

Applied from outside a built model (`apply_expert_parallel`): each MoE layer becomes an
`ExpertParallelMoE` with the same parameter names, holding only its rank's slice of the stacked
experts. A token goes to each EP rank that holds one of its experts ONCE (with the gate weights of
the experts it picked there), so device-limited routing (top-M ranks per token) really bounds
what it sends. Shape legend as in model.py, plus
  P EP ranks ("devices"), L experts per rank (E = P*L), N (token, rank) rows sent from this rank,
  R rows received by this rank, K slots per row (the token's K choices; -1 where not on this rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model import MoE, RouterOutput, grouped_swiglu


# ----------------------------------------------------------------------------- all-to-all with autograd
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient is the reverse all-to-all.

    With `pending` (a list), the forward is launched asynchronously and its Work appended, so the
    caller computes something else (the shared experts) and calls `.wait()` before reading the
    result. The backward is synchronous: by then nothing is left to overlap it with.
    """

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, pending=None):
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        work = dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group,
                                      async_op=pending is not None)
        if pending is not None:
            pending.append(work)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, pending=None) -> torch.Tensor:
    """Rows x[sum(in_splits)] -> rows [sum(out_splits)]: chunk r of x goes to rank r, chunk r of the result came from it."""
    return _AllToAll.apply(x, out_splits, in_splits, group, pending)


# ----------------------------------------------------------------------------- device-level dropping
def device_keep_mask(affinity_A: torch.Tensor, protected_A: torch.Tensor, capacity: int) -> torch.Tensor:
    """One device's token dropping (report 2.2.4): keep at most `capacity` assignments.

    Protected assignments (about 10% of sequences) are always kept and fill the budget first; the
    rest is taken by affinity, highest first. affinity_A fp32, protected_A bool -> keep_A bool.
    """
    A = affinity_A.numel()
    if A <= capacity:
        return torch.ones(A, dtype=torch.bool, device=affinity_A.device)
    # Sort key: protected first, then by affinity (affinities are in [0, 1], so +2 separates them).
    key_A = affinity_A.float() + 2.0 * protected_A.float()
    order = key_A.argsort(descending=True, stable=True)
    n_keep = max(capacity, int(protected_A.sum()))
    keep = torch.zeros(A, dtype=torch.bool, device=affinity_A.device)
    keep[order[:n_keep]] = True
    return keep


@dataclass
class EPRouterOutput(RouterOutput):
    """RouterOutput plus what the dispatch really moved (for the device and communication losses)."""
    sent_MP: torch.Tensor | None = None    # [M, P] bool: token t was sent to EP rank p
    assigned_MP: torch.Tensor | None = None  # [M, P] int: how many of token t's K experts live on rank p
    recv_tokens: int = 0        # token rows this rank received from the whole EP group
    recv_assignments: int = 0   # (token, expert) pairs among them before dropping


# ----------------------------------------------------------------------------- the layer
class ExpertParallelMoE(MoE):
    """A MoE layer whose routed experts are spread over an EP process group.

    Same parameters and names as `MoE` (gate, experts with the local slice, shared_experts); same
    forward contract: x [..., D] -> (y, RouterOutput). Token dropping (training, when the
    trainer's `dropper` is set) is decided by each receiving rank against its real capacity
    ceil(capacity_factor * (assignments of the whole EP group) / P): the rule of the
    single-process `train.routing.drop_assignments` with D = P over the group's tokens. Tokens in
    `dropper.protected` are never dropped.
    """

    def __init__(self, moe: MoE, group, ep_rank: int, ep_size: int):
        nn.Module.__init__(self)
        self.gate, self.experts, self.shared_experts = moe.gate, moe.experts, moe.shared_experts
        self.dropper = moe.dropper
        self.group, self.ep_rank, self.ep_size = group, ep_rank, ep_size
        E = moe.experts.n_experts
        if E % ep_size:
            raise ValueError(f"n_routed_experts ({E}) must be divisible by parallel.ep_size ({ep_size})")
        self.n_experts = E
        self.n_local = L = E // ep_size
        lo = ep_rank * L
        ex = self.experts
        # Keep only this rank's slice (a copy, so the full stacked tensors can be freed).
        ex.gate_up_proj = nn.Parameter(ex.gate_up_proj.detach()[lo:lo + L].clone(), ex.gate_up_proj.requires_grad)
        ex.down_proj = nn.Parameter(ex.down_proj.detach()[lo:lo + L].clone(), ex.down_proj.requires_grad)
        ex.n_experts = L
        ex.expert_offset, ex.n_global_experts = lo, E  # checkpoints store the rows under their global index
        ex.is_expert_parallel = True
        self.overlap = True  # shared experts while the dispatch is in flight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape, P, L = x.shape, self.ep_size, self.n_local
        x_MD = x.reshape(-1, shape[-1])
        M, K = x_MD.shape[0], self.gate.top_k
        scores_ME, topk_weight_MK, topk_idx_MK = self.gate(x_MD)
        # The trainer's dropper (train.routing.DeviceDropper) supplies the capacity factor and the
        # protected tokens; the decision is taken here, by each receiving rank, on real loads.
        dropper = self.dropper if self.training else None
        dropping = dropper is not None
        protected = getattr(dropper, "protected", None)

        # (token, rank) rows to send, ordered by rank then token: row n = (rank_N[n], token_N[n]).
        rank_MK = topk_idx_MK // L
        assigned_MP = torch.zeros(M, P, dtype=torch.int64, device=x.device).scatter_add_(
            1, rank_MK, torch.ones_like(rank_MK))
        sent_MP = assigned_MP > 0
        rank_N, token_N = sent_MP.t().nonzero(as_tuple=True)
        match_NK = rank_MK[token_N] == rank_N[:, None]            # which of the token's slots live there
        local_NK = torch.where(match_NK, topk_idx_MK[token_N] - rank_N[:, None] * L, -1)
        weight_NK = torch.where(match_NK, topk_weight_MK[token_N], 0.0)
        affinity_NK = scores_ME.detach().gather(1, topk_idx_MK)[token_N]
        protected_N = (protected.reshape(-1).to(x.device)[token_N] if dropping and protected is not None
                       else torch.zeros_like(token_N, dtype=torch.bool))

        # Sizes first: rows and assignments per destination, and this rank's token count.
        send_info_P3 = torch.stack([sent_MP.sum(0), assigned_MP.sum(0),
                                    torch.full((P,), M, device=x.device, dtype=torch.int64)], dim=1)
        recv_info_P3 = torch.empty_like(send_info_P3)
        dist.all_to_all_single(recv_info_P3, send_info_P3, group=self.group)
        recv_info = recv_info_P3.tolist()  # host sync: the splits must be known on the host
        in_splits = send_info_P3[:, 0].tolist()
        out_splits = [r[0] for r in recv_info]
        group_assignments = sum(r[2] for r in recv_info) * K  # every token of the EP group, K each

        # Dispatch: token rows asynchronously; the small per-row metadata (one fp32 tensor, exact
        # for the integer columns) synchronously. Gate weights carry gradient back to the router.
        pending: list = []
        x_ND = x_MD[token_N].to(compute_dtype(x_MD))  # bf16 on the wire under autocast
        x_RD = all_to_all(x_ND, out_splits, in_splits, self.group, pending if self.overlap else None)
        meta_N = torch.cat([weight_NK, affinity_NK, local_NK.float(), protected_N.float()[:, None]], dim=1)
        meta_R = all_to_all(meta_N, out_splits, in_splits, self.group)
        shared = self.shared_experts(x_MD) if self.shared_experts is not None else None
        for work in pending:
            work.wait()

        w_RK, aff_RK = meta_R[:, :K], meta_R[:, K:2 * K]
        local_RK = meta_R[:, 2 * K:3 * K].detach().round().long()
        valid_RK = local_RK >= 0
        kept_RK = valid_RK
        if dropping:
            capacity = math.ceil(getattr(dropper, "capacity_factor", 1.0) * group_assignments / P)
            slots = valid_RK.flatten().nonzero().squeeze(1)
            prot_R = meta_R[:, 3 * K].detach() > 0.5
            keep_A = device_keep_mask(aff_RK.flatten()[slots], prot_R[slots // K], capacity)
            kept_RK = torch.zeros_like(valid_RK).flatten().index_fill_(0, slots[keep_A], True).view_as(valid_RK)
        y_RD = local_experts_forward(self.experts, x_RD, local_RK, w_RK, kept_RK)

        # Combine: rows come back in the order they were sent.
        y_ND = all_to_all(y_RD, in_splits, out_splits, self.group)
        y_MD = torch.zeros_like(x_MD).index_add_(0, token_N, y_ND.to(x_MD.dtype))
        if shared is not None:
            y_MD = y_MD + shared

        kept_MK = None
        if dropping:
            kept_back_NK = all_to_all(kept_RK.float(), in_splits, out_splits, self.group) > 0.5
            n_idx, k_idx = match_NK.nonzero(as_tuple=True)
            kept_MK = torch.ones(M, K, dtype=torch.bool, device=x.device)
            kept_MK[token_N[n_idx], k_idx] = kept_back_NK[n_idx, k_idx]
            topk_weight_MK = topk_weight_MK * kept_MK
        router = EPRouterOutput(scores_ME, topk_idx_MK, topk_weight_MK, kept_MK, sent_MP=sent_MP, assigned_MP=assigned_MP,
                                recv_tokens=sum(out_splits), recv_assignments=sum(r[1] for r in recv_info))
        return y_MD.view(shape), router


def local_experts_forward(experts, x_RD: torch.Tensor, local_RK: torch.Tensor, w_RK: torch.Tensor,
                          kept_RK: torch.Tensor) -> torch.Tensor:
    """Rows through their (up to K) experts of `experts` (slots with kept False skipped), weighted
    and summed per row: the same sorted grouped GEMMs as `Experts.forward`, over a variable slot set."""
    R, K = local_RK.shape
    out_dtype = x_RD.dtype
    x_RD = x_RD.to(compute_dtype(x_RD))
    w_gate_up, w_down = experts.gate_up_proj.to(x_RD.dtype), experts.down_proj.to(x_RD.dtype)
    slots_A = kept_RK.flatten().nonzero().squeeze(1)
    expert_A = local_RK.flatten()[slots_A]
    order = expert_A.argsort(stable=True)
    slots_A = slots_A[order]
    row_A = slots_A // K
    counts_L = torch.bincount(expert_A, minlength=experts.n_experts)
    y_AD = grouped_swiglu(x_RD[row_A], w_gate_up, w_down, counts_L, experts.use_grouped_mm(x_RD))
    y_AD = (y_AD.float() * w_RK.flatten()[slots_A, None]).to(out_dtype)
    return x_RD.new_zeros(R, x_RD.shape[1], dtype=out_dtype).index_add_(0, row_A, y_AD)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast does not cover grouped GEMMs (nor what we send): its dtype on CUDA, else x's own."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


# ----------------------------------------------------------------------------- apply / inspect
def moe_layers(model) -> list[MoE]:
    return [layer.mlp for layer in model.model.layers if layer.is_moe]


def apply_expert_parallel(model, group, ep_rank: int, ep_size: int, devices_per_token: int | None = None):
    """Split every MoE layer's routed experts over `group` (ep_size ranks), in place.

    devices_per_token (the report's M): device-limited routing over the real ranks,
    `Router.device_limit = (ep_size, M)`; None or >= ep_size leaves routing unchanged.
    """
    if ep_size <= 1:
        return model
    for layer in model.model.layers:
        if layer.is_moe and not isinstance(layer.mlp, ExpertParallelMoE):
            layer.mlp = ExpertParallelMoE(layer.mlp, group, ep_rank, ep_size)
            if devices_per_token is not None and devices_per_token < ep_size:
                layer.mlp.gate.device_limit = (ep_size, devices_per_token)
    return model


def is_expert_param(name: str) -> bool:
    """Routed-expert tensors: sliced over EP ranks, replicated over DP only."""
    return name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj")


__all__ = ["ExpertParallelMoE", "EPRouterOutput", "apply_expert_parallel", "all_to_all", "device_keep_mask",
           "local_experts_forward",
           "moe_layers", "is_expert_param"]
