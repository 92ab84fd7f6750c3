"""The physical floors the benchmarks grade against, measured on the device that runs them.

A decode step is bound by bytes (the weights it touches and the latent cache it reads) and a long prefill by
dense compute. Their floors are those amounts at what this device sustains, measured here in the same process:
the bandwidth of a large device-to-device copy (bytes read + written) and the FLOP/s of a large GEMM in the
model's dtype. Constants would grade one card by another's speed: until 2026-12-07 the end-to-end benchmark
used an H200's figures (4.3 TB/s, 790 TFLOP/s) on every device, so its H100 runs were graded against an
H200's memory.

The byte and FLOP counts of the V2 architecture live here too (`decode_bytes`, `active_params`), so every
benchmark counts them the same way.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from timing import median_seconds


@dataclasses.dataclass(frozen=True)
class Floors:
    bandwidth: float      # bytes/s a device-to-device copy sustains (bytes read + written)
    flops: float          # FLOP/s of a large GEMM in `dtype`
    dtype: torch.dtype
    device: str

    def describe(self) -> str:
        return (f"measured on this device in the same run: a device-to-device copy {self.bandwidth / 1e12:.3g} TB/s "
                f"(bytes read + written), a {str(self.dtype).replace('torch.', '')} GEMM "
                f"{self.flops / 1e12:.3g} TFLOP/s")


@functools.lru_cache(maxsize=None)
def measured(device: torch.device | str = "cuda", dtype: torch.dtype = torch.bfloat16) -> Floors:
    """This device's sustained copy bandwidth and GEMM FLOP/s (once per process and device). On a GPU: a
    1 GiB copy and an 8192^3 GEMM, medians of CUDA-event timings; on a CPU (smoke runs) small sizes in fp32."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    n_bytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    # 20 warm-up calls on a GPU: with 3, the first process on a fresh H100 read 757 TFLOP/s and the next one 785
    # (the cause was not separated; a longer warm-up costs a few tens of milliseconds).
    warmup = 20 if cuda else 1
    copy_s = median_seconds(lambda: dst.copy_(src), iters=10 if cuda else 3, warmup=warmup)
    del src, dst
    dtype = dtype if cuda else torch.float32
    n = 8192 if cuda else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm_s = median_seconds(lambda: a @ b, iters=10 if cuda else 3, warmup=warmup)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return Floors(bandwidth=2 * n_bytes / copy_s, flops=2 * n ** 3 / gemm_s, dtype=dtype, device=name)


def active_params(cfg) -> float:
    """Parameters a token multiplies (routed experts: only its K), without the embedding table."""
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    routed = cfg.num_moe_layers * cfg.n_routed_experts * expert
    return (cfg.num_parameters() - routed - cfg.vocab_size * cfg.hidden_size
            + cfg.num_moe_layers * cfg.num_experts_per_tok * expert)


def decode_bytes(cfg, B: int, L: int, dtype_bytes: int = 2, fp8_weights: bool = False,
                 cache_bytes_per_token: int | None = None) -> float:
    """Bytes one decode step of B sequences at context L must read: the weights it touches (the routed experts
    B tokens hit under uniform routing; the embedding table counted out, the LM head in) and the latent cache.
    `fp8_weights`: the engine's quantization="fp8" tree, one byte an element plus a 4-byte scale per 128 x 128
    tile, except the LM head and kv_b_proj (engine/layers.py FP8_SKIP), which stay at `dtype_bytes` (the norms'
    and routers' few MB, also unquantised, are counted at one byte: under 0.3% of a V2-Lite batch-1 step).
    `cache_bytes_per_token` (all layers) replaces the cache's `dtype_bytes` an element (the FP8 cache's scales)."""
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    routed = cfg.num_moe_layers * cfg.n_routed_experts * expert
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = E * (1 - (1 - K / E) ** B)   # distinct experts hit by B tokens
    weights = cfg.num_parameters() - routed - cfg.vocab_size * cfg.hidden_size + cfg.num_moe_layers * touched * expert
    if fp8_weights:
        kept = cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * cfg.kv_lora_rank * cfg.num_attention_heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        weight_bytes = (weights - kept) * (1 + 4 / 128 ** 2) + kept * dtype_bytes
    else:
        weight_bytes = weights * dtype_bytes
    per_token = cache_bytes_per_token or cfg.kv_cache_elements_per_token() * dtype_bytes
    return weight_bytes + B * L * per_token


@functools.lru_cache(maxsize=None)
def fp8_gemm_flops(device: torch.device | str = "cuda") -> float | None:
    """FLOP/s of torch's FP8 GEMM (e4m3 operands, one scale per tensor) at 8192^3 on this device: the FP8
    engines' compute floor. None where this GPU or torch has none."""
    try:
        a = torch.randn(8192, 8192, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(8192, 8192, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        s = median_seconds(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                           iters=20, warmup=20)
    except (RuntimeError, TypeError) as exc:
        print(f"[note] no FP8 GEMM rate: {type(exc).__name__}: {str(exc)[:120]}")
        return None
    return 2 * 8192 ** 3 / s
