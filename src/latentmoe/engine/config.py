"""EngineConfig: every option of the inference engine, validated in one place.

`LLM(model, **options)` builds one (or takes `config=`); the command line builds one from its
arguments (commands/_engine_args.py); the runner, planner and scheduler read it. Options left None
depend on where the model runs and are settled by `resolved(device, dtype)` when the engine starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import kernels
from ..checkpoint import resolve_dtype
from .kv_cache import CacheLayout, activation_bytes_per_token, cache_layout

EXPERTS_IMPLS = ("model", "fused")
QUANTIZATIONS = (None, "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")


@dataclass
class EngineConfig:
    device: str | torch.device | None = None   # default: the model's; for a checkpoint path CUDA if present, else CPU
    dtype: str | torch.dtype | None = None     # default: the model's; for a path bf16 on CUDA, fp32 on CPU
    max_num_seqs: int = 256                    # sequences batched together at most (also the largest graph bucket)
    max_model_len: int | None = None           # prompt + output tokens per sequence (default: model max, cache allowing)
    # Tokens per step. Default on CUDA: the largest of CUDA_BUDGETS whose step activations fit in
    # ACTIVATION_SHARE of the device's memory (V2-Lite: 65,536 on an 80 GB card, 131,072 on 141 GB; see default_budget);
    # `latentmoe serve` and `chat` use 8,192 (shorter steps between tokens); elsewhere max(2048, max_num_seqs).
    # Start-up compiles prefill for every count up to it.
    max_num_batched_tokens: int | None = None
    # Steps a newly arrived request may wait while others decode, so that arrivals are prefilled together
    # (scheduler.py): decode-only steps replay a CUDA graph, steps with a prefill chunk run eagerly. It waits
    # less when the waiting prompts fill the token budget, and never when nothing decodes. Default 0 (admit at
    # once): on an H200 serving V2-Lite at concurrency 16-256, holding 8 or 16 steps left throughput within
    # run-to-run spread and raised time to first token (results/serve.md).
    prefill_hold_steps: int = 0
    block_size: int = 64                       # tokens per cache block
    num_blocks: int | None = None              # cache size in blocks, instead of a memory budget
    cache_memory_gb: float | None = None       # cache budget (default: automatic, see kv_cache.plan_cache)
    gpu_memory_utilization: float = 0.9        # share of the GPU's memory the engine may use (weights + cache + rest)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False                # no CUDA graphs
    # While a step runs on the device, schedule and queue the next one (input ids this step samples are
    # read on the device), then read this step's tokens and do its host work (stops, outputs) while the
    # next one runs: the host's share of a step leaves the critical path (llm_engine.py, "Looking ahead").
    async_scheduling: bool = True
    # Routed experts: "fused" = the Triton fused-MoE kernel, "model" = the model's grouped GEMMs.
    # Default "fused" on CUDA: for bf16/fp16 its logits are as close to an fp32 reference as the model's
    # own path (bf16 rounding either way; results/engine.md), and it is faster; fp32 dots run in full
    # fp32. The model's fp32 path reads expert counts back to the host, which a decode CUDA graph
    # cannot capture, so fp32 on CUDA takes the kernel too.
    experts_impl: str | None = None
    # Fused RMSNorm / MLA post-projection / greedy router kernels: default on CUDA (where Triton runs).
    fused_ops: bool | None = None
    kv_cache: str | CacheLayout = "latent"     # "latent", "mha" (the per-head baseline) or a CacheLayout
    # One process per device (engine/distributed.py): attention split by heads, dense MLPs and shared
    # experts column/row-parallel; routed experts split along their width, or with
    # enable_expert_parallel whole experts spread over the ranks.
    tensor_parallel_size: int = 1
    enable_expert_parallel: bool = False
    # "fp8": Linears and routed experts in block-FP8 (e4m3, 128x128 scales), quantised on load or read
    # from a block-FP8 checkpoint; None: the compute dtype.
    quantization: str | None = None
    kv_cache_dtype: str = "auto"               # "auto" (the compute dtype) or "fp8" (e4m3 latent cache + scales)

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("max_num_seqs", "block_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        for name in ("max_model_len", "max_num_batched_tokens"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise bad(name, "a positive integer or None")
        if not is_int(self.prefill_hold_steps) or self.prefill_hold_steps < 0:
            raise bad("prefill_hold_steps", "an integer >= 0")
        if self.num_blocks is not None and (not is_int(self.num_blocks) or self.num_blocks < 2):
            raise bad("num_blocks", "an integer >= 2 (one block is reserved) or None")
        if self.cache_memory_gb is not None and (isinstance(self.cache_memory_gb, bool)
                                                 or not isinstance(self.cache_memory_gb, (int, float))
                                                 or not self.cache_memory_gb > 0):
            raise bad("cache_memory_gb", "a positive number or None")
        if (isinstance(self.gpu_memory_utilization, bool) or not isinstance(self.gpu_memory_utilization, (int, float))
                or not 0 < self.gpu_memory_utilization <= 1):
            raise bad("gpu_memory_utilization", "a number in (0, 1]")
        if self.num_blocks is not None and self.cache_memory_gb is not None:
            raise ValueError("give num_blocks or cache_memory_gb, not both")
        if not is_int(self.tensor_parallel_size) or self.tensor_parallel_size < 1:
            raise bad("tensor_parallel_size", "a positive integer")
        for name in ("enable_prefix_caching", "enforce_eager", "enable_expert_parallel", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if self.enable_expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("enable_expert_parallel spreads the routed experts over the tensor_parallel_size "
                             "processes: set tensor_parallel_size > 1 too")
        if self.fused_ops is not None and not isinstance(self.fused_ops, bool):
            raise bad("fused_ops", "True, False or None (automatic)")
        if self.experts_impl == "auto":
            self.experts_impl = None
        if self.experts_impl is not None and self.experts_impl not in EXPERTS_IMPLS:
            raise bad("experts_impl", "'model', 'fused' or None (automatic)")
        if self.device is not None:
            try:
                self.device = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise bad("device", "a device such as 'cuda', 'cuda:1' or 'cpu'") from None
        if self.dtype is not None:
            self.dtype = _parse_dtype(self.dtype)
        if self.quantization not in QUANTIZATIONS:
            raise bad("quantization", "None or 'fp8'")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise bad("kv_cache_dtype", "'auto' or 'fp8'")
        self.kv_cache = cache_layout(self.kv_cache, self.kv_cache_dtype)
        if self.uses_fp8:
            check_fp8_device(self.device)

    @property
    def uses_fp8(self) -> bool:
        return self.quantization == "fp8" or self.kv_cache_dtype == "fp8"

    def resolved(self, device: torch.device, dtype: torch.dtype, model_config=None) -> "EngineConfig":
        """This config for a model on `device` in `dtype`: device, dtype and the automatic choices settled
        (the token budget by the model's activation size where `model_config` is given)."""
        cuda = device.type == "cuda"
        experts = self.experts_impl
        if experts is None:
            experts = "fused" if cuda and dtype in (torch.bfloat16, torch.float16, torch.float32) else "model"
        fused_ops = self.fused_ops if self.fused_ops is not None else cuda and kernels.HAS_TRITON
        if self.uses_fp8:
            check_fp8_device(device)
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = max(default_budget(device, dtype, model_config) if cuda else 2048, self.max_num_seqs)
        return dataclasses.replace(self, device=device, dtype=dtype, experts_impl=experts, fused_ops=fused_ops,
                                   max_num_batched_tokens=budget)


# Default token budgets on CUDA, largest first. Fewer, larger prefill steps pay each step's fixed cost (every
# weight read, the running sequences' decode attention, launch tails) fewer times: H100, V2-Lite shape, one
# engine with the budget switched between runs (6 rounds, interleaved), 200 x (1,000 in, 100 out) medians
# 3.468 / 3.394 / 3.354 s at 16,384 / 32,768 / 65,536, 256 x (256-1,024 in, 128 out) 3.52 / 3.51 / 3.46 s;
# one 32K or 128K prompt within 2% at each (benchmarks/bench_budget.py reruns this comparison). Again with 131,072
# (H100, 4 rounds): 3.370 / 3.485 / 3.679 s at 131,072 / 65,536 / 16,384, 256 x (256-1,024 in, 128 out) 3.50 / 3.52
# / 3.76 s. V2-Lite's 131,072-token step (82 KB a token, kv_cache.activation_bytes_per_token) fits the share on a
# 141 GB card, not on an 80 GB one.
CUDA_BUDGETS = (131072, 65536, 32768, 16384)
ACTIVATION_SHARE = 0.08


def default_budget(device: torch.device, dtype: torch.dtype, model_config=None) -> int:
    """The token budget on CUDA: the largest of CUDA_BUDGETS whose activations (kv_cache.
    activation_bytes_per_token each) take at most ACTIVATION_SHARE of the device's memory; the smallest
    without a model config."""
    if model_config is None:
        return CUDA_BUDGETS[-1]
    total = torch.cuda.get_device_properties(device).total_memory
    per_token = activation_bytes_per_token(model_config, dtype)
    return next((b for b in CUDA_BUDGETS if b * per_token <= ACTIVATION_SHARE * total), CUDA_BUDGETS[-1])


def check_fp8_device(device: torch.device | None) -> None:
    """FP8 runs on CPU (the reference path) and on GPUs with FP8 support (compute capability 8.9+: Ada,
    Hopper and later); anything else is refused here, before a model is loaded. `None` is the default
    device: the first GPU if there is one."""
    if device is None:
        if not torch.cuda.is_available():
            return
        device = torch.device("cuda")
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"FP8 (quantization='fp8' / kv_cache_dtype='fp8') needs a GPU with FP8 support (compute "
                         f"capability 8.9+, e.g. L4, H100); {device} is {name} ({cap[0]}.{cap[1]})")


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype == "auto":
        return None
    if isinstance(dtype, str):
        return resolve_dtype(dtype, torch.device("cpu"))   # raises, naming the accepted names
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise ValueError(f"dtype must be a floating-point torch dtype or its name, got {dtype!r}")


__all__ = ["EngineConfig", "EXPERTS_IMPLS", "QUANTIZATIONS", "KV_CACHE_DTYPES", "check_fp8_device", "default_budget",
           "CUDA_BUDGETS"]
