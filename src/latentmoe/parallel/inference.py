"""Expert-parallel inference in one process: a model's routed experts split over N devices of a host.

For a model too large for one GPU (DeepSeek-V2's 236B are ~93% routed experts): everything else,
and the engine's latent cache, stays on the first device; each MoE layer's experts are cut into N
equal slices, slice d on device d. Per layer the tokens that chose an expert on device d are
copied there, run through its experts and their weighted sum copied back. The engine takes the
model built this way like any other (`LLM(load_model_expert_parallel(path, N), enforce_eager=True)`;
`serve/generate/chat --ep N` do that) and knows nothing of the split.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..checkpoint import resolve_dtype, fill_from_checkpoint
from ..config import ModelConfig
from ..model import DeepseekV2ForCausalLM, Experts
from .expert_parallel import local_experts_forward


class DeviceShardedExperts(nn.Module):
    """Drop-in for `Experts` (same forward) whose slice d lives on devices[d]."""

    def __init__(self, cfg: ModelConfig, devices: list[torch.device]):
        super().__init__()
        E, N = cfg.n_routed_experts, len(devices)
        if E % N:
            raise ValueError(f"expert_parallel_size ({N}) must divide n_routed_experts ({E})")
        self.n_experts, self.n_local, self.devices = E, E // N, devices
        # A slice is an `Experts` of E/N experts (built full-size on meta, then cut: no memory).
        self.shards = nn.ModuleList()
        for _ in devices:
            shard = Experts(cfg)
            shard.n_experts = E // N
            shard.gate_up_proj = nn.Parameter(shard.gate_up_proj[: E // N])
            shard.down_proj = nn.Parameter(shard.down_proj[: E // N])
            self.shards.append(shard)
        self.impl = "auto"

    def forward(self, x_MD: torch.Tensor, topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor) -> torch.Tensor:
        L, M = self.n_local, x_MD.shape[0]
        dev_MK = topk_idx_MK // L
        sent_MN = torch.zeros(M, len(self.devices), dtype=torch.bool, device=x_MD.device).scatter_(1, dev_MK, True)
        dev_R, token_R = sent_MN.t().nonzero(as_tuple=True)  # rows ordered by device
        counts = sent_MN.sum(0).tolist()  # host sync: one per layer, for the slice bounds
        match_RK = dev_MK[token_R] == dev_R[:, None]
        local_RK = torch.where(match_RK, topk_idx_MK[token_R] - dev_R[:, None] * L, -1)
        w_RK = torch.where(match_RK, topk_weight_MK[token_R], 0.0)
        y_MD = torch.zeros_like(x_MD)
        start = 0
        for shard, device, n in zip(self.shards, self.devices, counts):
            if n:
                rows = slice(start, start + n)
                shard.impl = self.impl
                y = local_experts_forward(shard, x_MD[token_R[rows]].to(device, non_blocking=True),
                                          local_RK[rows].to(device, non_blocking=True),
                                          w_RK[rows].to(device, non_blocking=True),
                                          match_RK[rows].to(device, non_blocking=True))
                y_MD.index_add_(0, token_R[rows], y.to(x_MD.device, non_blocking=True))
            start += n
        return y_MD


def resolve_devices(num: int, device: torch.device | str | None = None) -> list[torch.device]:
    """N devices: cuda:0..N-1 when CUDA is there (or `device` is CUDA), else N times the CPU (for tests)."""
    base = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if base.type != "cuda":
        return [base] * num
    first = base.index or 0
    if first + num > torch.cuda.device_count():
        raise ValueError(f"expert_parallel_size {num} from cuda:{first} needs {first + num} GPUs; "
                         f"{torch.cuda.device_count()} visible")
    return [torch.device("cuda", first + i) for i in range(num)]


def _entries(model: DeepseekV2ForCausalLM):
    """(checkpoint name, tensor) for the sharded model: expert slice d, row e -> global expert d*L + e."""
    tied = model.config.tie_word_embeddings
    for name, t in model.state_dict(keep_vars=True).items():
        if tied and name == "lm_head.weight":
            continue
        if ".mlp.experts.shards." in name:
            prefix, rest = name.split(".shards.")
            d, kind = rest.split(".")
            L = t.shape[0]
            for e in range(L):
                g = int(d) * L + e
                if kind == "gate_up_proj":
                    inter = t.shape[1] // 2
                    yield f"{prefix}.{g}.gate_proj.weight", t.data[e, :inter]
                    yield f"{prefix}.{g}.up_proj.weight", t.data[e, inter:]
                else:
                    yield f"{prefix}.{g}.down_proj.weight", t.data[e]
        else:
            yield name, t.data


@torch.no_grad()
def load_model_expert_parallel(path: str | os.PathLike, expert_parallel_size: int,
                               device: torch.device | str | None = None,
                               dtype: torch.dtype | str | None = None) -> DeepseekV2ForCausalLM:
    """Like `load_model`, with each MoE layer's experts on `expert_parallel_size` devices.

    Tensors go straight from the safetensors files to their device: no device ever holds more
    than its share of the experts.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_json(path)
    devices = resolve_devices(expert_parallel_size, device)
    dtype = resolve_dtype(dtype, devices[0])
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg)
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.experts = DeviceShardedExperts(cfg, devices)
    model.to(dtype)
    # Allocate each tensor directly on its device (model.to_empty would put every expert on the first).
    home = {id(shard): dev for m in model.modules() if isinstance(m, DeviceShardedExperts)
            for shard, dev in zip(m.shards, devices)}
    for module in model.modules():
        dev = home.get(id(module), devices[0])
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(torch.empty_like(p, device=dev), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty_like(b, device=dev))
    model.tie_weights()
    fill_from_checkpoint(path, dict(_entries(model)))
    model.eval()
    return model


__all__ = ["DeviceShardedExperts", "load_model_expert_parallel", "resolve_devices"]
