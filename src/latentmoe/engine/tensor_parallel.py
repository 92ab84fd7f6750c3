"""One rank's share of the model: which slice of every weight it holds, the modules that reduce over
the ranks, and loading only that slice from the safetensors files.

Applied from outside the model: the model is built full-size on the meta device (free), then the
modules below are swapped in at their local sizes, allocated on the rank's device and filled from the
checkpoint with `safe_open(...).get_slice`, so a rank never reads another rank's bytes. Legend as in
model.py, plus P ranks, r this rank, h = H/P heads per rank.

| module                             | split                                   | collective          |
|------------------------------------|-----------------------------------------|---------------------|
| attention q_proj / q_b_proj        | rows of heads r*h .. (r+1)*h            |                     |
| attention kv_b_proj                | rows of the same heads ([k_nope | v])   |                     |
| attention o_proj                   | columns of those heads (RowParallel)    | all_reduce          |
| dense MLP gate/up, down            | rows of I / columns of I (RowParallel)  | all_reduce          |
| shared experts                     | as the dense MLP                        | one all_reduce with |
| routed experts (default)           | rows/columns of every expert's I        | the routed experts  |
| routed experts (expert parallel)   | whole experts r*E/P .. (r+1)*E/P        | (ParallelMoE)       |
| q_a/kv_a projections, norms, router, embeddings, lm_head | replicated       |                     |

Each rank keeps its own latent cache: the latent row is shared by all heads, so every rank writes
the same rows and reads them with its own heads. Every rank holds the whole batch; with expert
parallelism a rank runs its experts on the assignments routed to them (the dispatch is a local
selection, since every token is already on every rank) and the combine is the all_reduce that also
sums the shared experts' and the routed experts' partial outputs: one collective per MoE layer.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..config import ModelConfig
from ..model import MLP, DeepseekV2ForCausalLM, Experts, MoE, RouterOutput
from .layers import EngineExperts


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world: int
    expert_parallel: bool = False


def check_divisible(cfg: ModelConfig, world: int, expert_parallel: bool) -> None:
    """ValueError naming every size that `world` ranks cannot split evenly (nothing is padded)."""
    if world == 1:
        return
    sizes = [("num_attention_heads", cfg.num_attention_heads)]
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        sizes.append(("intermediate_size", cfg.intermediate_size))
    if cfg.n_routed_experts:
        sizes.append(("n_routed_experts" if expert_parallel else "moe_intermediate_size",
                      cfg.n_routed_experts if expert_parallel else cfg.moe_intermediate_size))
        if cfg.n_shared_experts:
            sizes.append(("n_shared_experts * moe_intermediate_size",
                          cfg.n_shared_experts * cfg.moe_intermediate_size))
    bad = [f"{name} ({n})" for name, n in sizes if n % world]
    if bad:
        raise ValueError(f"tensor_parallel_size {world} must divide " + ", ".join(bad))


def local_config(cfg: ModelConfig, world: int) -> ModelConfig:
    """The config one rank's attention sees: H/P heads (the cache planner and per-head layouts read it)."""
    h = cfg.num_attention_heads // world
    return dataclasses.replace(cfg, num_attention_heads=h, num_key_value_heads=h)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(x)
    return x


class RowParallelLinear(nn.Linear):
    """A Linear holding a slice of the input features: partial products summed over the ranks, bias added once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class ParallelMoE(MoE):
    """MoE whose experts (and shared experts) hold this rank's share; one all_reduce sums the partial outputs.

    `expert_range` (expert parallelism): the global ids lo .. lo+L of the local experts. Assignments to
    other ranks' experts are skipped by the fused kernel (id -1, no GEMM rows: shapes never depend on
    the routing, so the decode graph holds); the model's own experts path gets them as local expert 0
    at weight 0 (computed, multiplied by zero)."""

    expert_range: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        x_MD = x.reshape(-1, shape[-1])
        scores, topk_weight, topk_idx = self.gate(x_MD)
        idx, w = topk_idx, topk_weight
        if self.expert_range is not None:
            lo, n = self.expert_range
            mine = (idx >= lo) & (idx < lo + n)
            if isinstance(self.experts, EngineExperts):
                idx = torch.where(mine, idx - lo, -1)
            else:
                idx, w = torch.where(mine, idx - lo, 0), torch.where(mine, w, 0.0)
        y = self.experts(x_MD, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_MD)
        return all_reduce(y).view(shape), RouterOutput(scores, topk_idx, topk_weight)


def _linear(cls, n_in: int, n_out: int, bias: bool) -> nn.Linear:
    with torch.device("meta"):
        return cls(n_in, n_out, bias=bias)


def _shard_mlp(mlp: MLP, P: int, reduce: bool) -> None:
    D, I = mlp.gate_proj.in_features, mlp.gate_proj.out_features
    mlp.gate_proj = _linear(nn.Linear, D, I // P, False)
    mlp.up_proj = _linear(nn.Linear, D, I // P, False)
    mlp.down_proj = _linear(RowParallelLinear if reduce else nn.Linear, I // P, D, False)


def build_shard(cfg: ModelConfig, plan: ShardPlan, device: torch.device, dtype: torch.dtype) -> DeepseekV2ForCausalLM:
    """This rank's model at its local sizes, allocated (uninitialised) on `device` in `dtype`."""
    P = plan.world
    check_divisible(cfg, P, plan.expert_parallel)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg)
    h = cfg.num_attention_heads // P
    for layer in model.model.layers:
        a = layer.self_attn
        a.n_heads = h
        q_out = h * a.qk_head_dim
        if a.q_lora_rank is None:
            a.q_proj = _linear(nn.Linear, cfg.hidden_size, q_out, False)
        else:
            a.q_b_proj = _linear(nn.Linear, a.q_lora_rank, q_out, False)
        a.kv_b_proj = _linear(nn.Linear, a.kv_lora_rank, h * (a.nope_dim + a.v_dim), False)
        a.o_proj = _linear(RowParallelLinear, h * a.v_dim, cfg.hidden_size, cfg.attention_bias)
        if not layer.is_moe:
            _shard_mlp(layer.mlp, P, reduce=True)
            continue
        moe = ParallelMoE.__new__(ParallelMoE)
        moe.__dict__.update(layer.mlp.__dict__)
        moe._modules = dict(layer.mlp._modules)
        if moe.shared_experts is not None:
            _shard_mlp(moe.shared_experts, P, reduce=False)   # summed by the MoE's own all_reduce
        E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        with torch.device("meta"):
            ex = Experts(cfg)
        if plan.expert_parallel:
            L = E // P
            moe.expert_range = (plan.rank * L, L)
            ex.skip_negative = True   # read by the engine's fused experts (layers.EngineExperts)
            ex.n_experts = L
            ex.gate_up_proj = nn.Parameter(torch.empty(L, 2 * I, D, device="meta"))
            ex.down_proj = nn.Parameter(torch.empty(L, D, I, device="meta"))
        else:
            ex.gate_up_proj = nn.Parameter(torch.empty(E, 2 * (I // P), D, device="meta"))
            ex.down_proj = nn.Parameter(torch.empty(E, D, I // P, device="meta"))
        moe.experts = ex
        layer.mlp = moe
    model.config = local_config(cfg, P)
    model.to(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _slices(name: str, cfg: ModelConfig, plan: ShardPlan):
    """Which part of the checkpoint tensor `name` this rank holds: None (all of it), a tuple of slices,
    or False (none: another rank's expert)."""
    P, r = plan.world, plan.rank
    if P == 1:
        return None

    def rows(n: int):
        return (slice(r * n // P, (r + 1) * n // P),)

    def cols(n: int):
        return (slice(None), slice(r * n // P, (r + 1) * n // P))

    H = cfg.num_attention_heads
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        return rows(H * cfg.qk_head_dim)
    if name.endswith("self_attn.kv_b_proj.weight"):
        return rows(H * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    if name.endswith("self_attn.o_proj.weight"):
        return cols(H * cfg.v_head_dim)
    if ".mlp.experts." in name:
        e = int(name.split(".mlp.experts.")[1].split(".")[0])
        if plan.expert_parallel:
            L = cfg.n_routed_experts // P
            return None if r * L <= e < (r + 1) * L else False
        I = cfg.moe_intermediate_size
        return cols(I) if name.endswith("down_proj.weight") else rows(I)
    if ".mlp." in name and name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
        layer = int(name.split("layers.")[1].split(".")[0])
        I = (cfg.n_shared_experts * cfg.moe_intermediate_size if cfg.is_moe_layer(layer) else cfg.intermediate_size)
        return cols(I) if name.endswith("down_proj.weight") else rows(I)
    return None


def _targets(model: DeepseekV2ForCausalLM, cfg: ModelConfig, plan: ShardPlan) -> dict[str, torch.Tensor]:
    """Checkpoint name -> the local tensor (or view) it fills."""
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.data
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix, half = name[: -len(".gate_up_proj")], t.shape[1] // 2
            lo = plan.rank * t.shape[0] if plan.expert_parallel else 0
            for e in range(t.shape[0]):
                out[f"{prefix}.{lo + e}.gate_proj.weight"] = t[e, :half]
                out[f"{prefix}.{lo + e}.up_proj.weight"] = t[e, half:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len(".down_proj")]
            lo = plan.rank * t.shape[0] if plan.expert_parallel else 0
            for e in range(t.shape[0]):
                out[f"{prefix}.{lo + e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


@torch.no_grad()
def load_shard(path: str | os.PathLike, plan: ShardPlan, device: torch.device,
               dtype: torch.dtype) -> DeepseekV2ForCausalLM:
    """This rank's model, its slices read straight from the checkpoint's safetensors files."""
    from ..checkpoint.hf import CheckpointError, _shard_files

    path = os.fspath(path)
    cfg = ModelConfig.from_json(path)
    model = build_shard(cfg, plan, device, dtype)
    targets = _targets(model, cfg, plan)
    seen, misshaped = set(), []
    for file in _shard_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                target = targets.get(name)
                part = _slices(name, cfg, plan)
                if target is None or part is False:
                    continue
                tensor = f.get_tensor(name) if part is None else f.get_slice(name)[part]
                if tuple(tensor.shape) != tuple(target.shape):
                    misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)} vs rank {plan.rank} {tuple(target.shape)}")
                    continue
                target.copy_(tensor)
                seen.add(name)
    missing = sorted(set(targets) - seen)
    if missing or misshaped:
        raise CheckpointError(f"checkpoint {path} does not match its config.json for rank {plan.rank}: "
                              f"{len(missing)} missing ({missing[:5]}), {len(misshaped)} mis-shaped ({misshaped[:5]})")
    model.eval()
    return model


__all__ = ["ShardPlan", "check_divisible", "local_config", "build_shard", "load_shard", "RowParallelLinear",
           "ParallelMoE"]
