"""What the paged cache keeps per token (its layout), and how many blocks a memory budget buys.

A layout knows its bytes per token (from the model config's derived sizes and the dtype), allocates
its per-layer caches for num_blocks x block_size, and returns the attention backend that reads
them. `LatentCache` is the engine's cache; `PerHeadCache` is what an MHA model of the same shape
would cache, the baseline of the MLA-vs-MHA comparison; `LatentFp8Cache` the latent cache in e4m3 with
per-token scales (kv_cache_dtype="fp8"). `cache_layout` is the one place a user's strings ("latent",
"mha"; "auto", "fp8") become a layout.
"""

from __future__ import annotations

import logging

import torch

from ..config import ModelConfig
from ..kv_report import fp8_latent_bytes_per_token
from .. import kernels
from .attention import PagedAttention, PagedLatentAttention, PagedPerHeadAttention

log = logging.getLogger("latentmoe.engine")

GiB = 1024 ** 3


class CacheLayout:
    """A cache layout: per-layer tensor shapes of one token, its size, allocation and attention backend."""

    name = ""

    def token_shapes(self, cfg: ModelConfig) -> list[tuple[int, ...]]:
        """The shapes one token occupies in each of a layer's cache tensors."""
        raise NotImplementedError

    def elements_per_token(self, cfg: ModelConfig) -> int:
        """All layers."""
        raise NotImplementedError

    def bytes_per_token(self, cfg: ModelConfig, dtype: torch.dtype) -> int:
        return self.elements_per_token(cfg) * dtype.itemsize

    def allocate(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> PagedAttention:
        """Zeroed caches for every layer, [num_blocks, block_size, *shape] each, inside their backend."""
        caches = [tuple(torch.zeros(num_blocks, block_size, *shape, dtype=dtype, device=device)
                        for shape in self.token_shapes(cfg))
                  for _ in range(cfg.num_hidden_layers)]
        return self.backend(caches)

    def backend(self, caches: list[tuple[torch.Tensor, ...]]) -> PagedAttention:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LatentCache(CacheLayout):
    """MLA's cache: one row [c_KV | k_R] (kv_lora_rank + rope dim) per token and layer, no per-head K or V."""

    name = "latent"

    def token_shapes(self, cfg):
        return [(cfg.kv_cache_width,)]

    def elements_per_token(self, cfg):
        return cfg.kv_cache_elements_per_token()

    def backend(self, caches):
        return PagedLatentAttention([c for (c,) in caches])


class PerHeadCache(CacheLayout):
    """An MHA model's cache of the same shape: per head a key (nope + rope dims) and a value, per token and layer.

    `decode_tuning` (block_n, num_warps, ctas_per_sm, min_tokens_per_split) is handed to
    kernels.mha_decode, so a benchmark can give the baseline the best its own sweep found.
    """

    name = "mha"

    def __init__(self, decode_tuning: dict | None = None):
        self.decode_tuning = dict(decode_tuning or {})

    def token_shapes(self, cfg):
        return [(cfg.num_attention_heads, cfg.qk_head_dim), (cfg.num_attention_heads, cfg.v_head_dim)]

    def elements_per_token(self, cfg):
        return cfg.mha_cache_elements_per_token()

    def backend(self, caches):
        return PagedPerHeadAttention(caches, self.decode_tuning)

    def __repr__(self) -> str:
        return f"PerHeadCache(decode_tuning={self.decode_tuning})" if self.decode_tuning else "PerHeadCache()"


class PagedLatentFp8Attention(PagedLatentAttention):
    """Over the FP8 latent cache: kv_caches[layer] = (rows e4m3 [NB, BS, C + R], scales fp32 [NB, BS, 2])."""

    def write_target(self, layer):
        return None   # rows are quantised on the way in (kernels.write_latent_cache_fp8)

    def write(self, layer, cache, slot_mapping, c_kv, k_pe) -> None:
        kernels.write_latent_cache_fp8(*cache, slot_mapping, c_kv, k_pe)

    @staticmethod
    def rows_and_scales(cache):
        return cache

    @staticmethod
    def context_rows(layer, cache, slots, dtype):
        # The gathered rows dequantised (to the queries' dtype) before the shared decompression.
        rows, scales = cache
        return kernels.dequantize_latent_rows(rows.view(-1, rows.shape[-1])[slots], scales.view(-1, 2)[slots],
                                              layer.kv_lora_rank, dtype)


class LatentFp8Cache(CacheLayout):
    """The latent cache in FP8: per token and layer C + R e4m3 bytes and two fp32 scales (c_kv's and
    k_pe's, kernels/fp8_cache.py), whatever the model's dtype: 584 bytes per token and layer for
    DeepSeek-V2 against 1,152 in bf16."""

    name = "latent-fp8"
    SCALES = 2

    def token_shapes(self, cfg):
        return [(cfg.kv_cache_width,), (self.SCALES,)]

    def elements_per_token(self, cfg):
        return cfg.kv_cache_elements_per_token()

    def bytes_per_token(self, cfg: ModelConfig, dtype: torch.dtype | None = None) -> int:
        return fp8_latent_bytes_per_token(cfg)

    def allocate(self, cfg, num_blocks, block_size, dtype, device):
        caches = [(torch.zeros(num_blocks, block_size, cfg.kv_cache_width, dtype=kernels.FP8, device=device),
                   torch.zeros(num_blocks, block_size, self.SCALES, dtype=torch.float32, device=device))
                  for _ in range(cfg.num_hidden_layers)]
        return self.backend(caches)

    def backend(self, caches):
        return PagedLatentFp8Attention(caches)


LAYOUTS = {"latent": LatentCache, "mha": PerHeadCache}
FP8_LAYOUTS = {"latent": LatentFp8Cache}


def cache_layout(spec: str | CacheLayout, kv_cache_dtype: str = "auto") -> CacheLayout:
    """A layout from its name ('latent', 'mha') and element type ('auto': the model's dtype, 'fp8'), or a
    CacheLayout itself."""
    if isinstance(spec, CacheLayout):
        if kv_cache_dtype == "fp8" and not isinstance(spec, LatentFp8Cache):
            raise ValueError(f"kv_cache_dtype='fp8' needs the latent cache, got the layout {spec!r}")
        return spec
    if not (isinstance(spec, str) and spec in LAYOUTS):
        raise ValueError(f"kv_cache must be one of {sorted(LAYOUTS)} or a CacheLayout, got {spec!r}")
    if kv_cache_dtype == "fp8":
        if spec not in FP8_LAYOUTS:
            raise ValueError(f"kv_cache_dtype='fp8' is supported for the {sorted(FP8_LAYOUTS)} cache, "
                             f"not kv_cache={spec!r}")
        return FP8_LAYOUTS[spec]()
    return LAYOUTS[spec]()


def check_servable(cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> None:
    """The engine's caches hold MLA latents: refuse the attention baselines (mha/gqa/mqa) with their cost."""
    if cfg.attention_type != "mla":
        per_token = cfg.kv_cache_elements_per_token() * dtype.itemsize
        mla = cfg.kv_cache_width * cfg.num_hidden_layers * dtype.itemsize
        raise ValueError(f"the engine serves MLA models; this one has attention_type {cfg.attention_type!r} "
                         f"({per_token:,} cache bytes/token; MLA of its shape: {mla:,}): evaluate it with "
                         f"the model directly (latentmoe eval, latentmoe ablate)")


def activation_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """An upper estimate of the activation bytes a prefill step holds per token at its peak: the residual
    stream and the block's input (a few [T, D] buffers) plus the largest sublayer's intermediates, whichever
    is largest of the dense MLP (gate, up, their product: 3 x intermediate_size), the MoE layer (each
    token's K expert rows, [T*K, D] out and [T*K, I] between the GEMMs, and the shared experts' gate, up and
    product) and the attention (q, the decompressed k and v, the output: per head 2 x qk + 2 x v).
    V2-Lite: 82 KB a token, against 51-57 KB measured (peak memory of engines at 16K- and 64K-token budgets, H100)."""
    d = cfg.hidden_size
    dense = 3 * cfg.intermediate_size if cfg.first_k_dense_replace > 0 or not cfg.n_routed_experts else 0
    moe = 0
    if cfg.n_routed_experts:
        i = cfg.moe_intermediate_size
        moe = cfg.num_experts_per_tok * (d + i) + 3 * (cfg.n_shared_experts or 0) * i
    attn = cfg.num_attention_heads * 2 * (cfg.qk_head_dim + cfg.v_head_dim)
    return (4 * d + max(dense, moe, attn)) * dtype.itemsize


def plan_cache(cfg: ModelConfig, layout: CacheLayout, device: torch.device, dtype: torch.dtype, block_size: int,
               cache_memory_gb: float | None, num_blocks: int | None, max_num_seqs: int,
               max_model_len: int | None, reserve_gb: float = 4.0,
               gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int | None = None) -> tuple[int, int]:
    """(num_blocks incl. the reserved one, max_model_len) from a memory budget, and the start-up log.

    Budget: `cache_memory_gb` if given; on CUDA otherwise `gpu_memory_utilization` of the device's
    memory, less what is already in use (the weights, other processes) and what is kept for activations
    and graphs: `reserve_gb`, or more where a step of `max_num_batched_tokens` tokens needs it (1 GiB plus
    activation_bytes_per_token for each: at 131,072 tokens a V2-Lite step's warm-up ran out of an H100's
    memory with 4 GiB kept); on CPU enough for `max_num_seqs` sequences of max_model_len (at most 1 GiB).
    """
    check_servable(cfg, dtype)
    if max_num_batched_tokens:
        reserve_gb = max(reserve_gb, 1 + max_num_batched_tokens * activation_bytes_per_token(cfg, dtype) / GiB)
    per_token = layout.bytes_per_token(cfg, dtype)
    per_block = per_token * block_size
    want_len = max_model_len or cfg.max_position_embeddings
    where = "num_blocks"
    if num_blocks is None:
        if cache_memory_gb is not None:
            budget, where = cache_memory_gb * GiB, f"cache_memory_gb={cache_memory_gb}"
        elif device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = gpu_memory_utilization * total - (total - free) - reserve_gb * GiB
            where = (f"gpu_memory_utilization={gpu_memory_utilization} of {total / GiB:.1f} GiB, less "
                     f"{(total - free) / GiB:.1f} GiB already in use (weights, other processes) and "
                     f"{reserve_gb:.1f} GiB kept for activations and graphs")
        else:
            budget = min(GiB, max_num_seqs * want_len * per_token)
        num_blocks = int(budget // per_block) + 1
    if num_blocks < 2:
        raise ValueError(f"no room for the KV cache: {where} leaves {max(num_blocks - 1, 0)} blocks of "
                         f"{per_block:,} bytes (at least 1 needed); raise gpu_memory_utilization, lower "
                         f"max_num_batched_tokens, or set cache_memory_gb / num_blocks")
    capacity = (num_blocks - 1) * block_size
    if max_model_len is None:
        max_model_len = min(cfg.max_position_embeddings, capacity)
    elif max_model_len > capacity:
        raise ValueError(f"max_model_len {max_model_len} does not fit in the cache ({capacity} tokens); "
                         f"raise cache_memory_gb or lower max_model_len")
    mha = PerHeadCache().bytes_per_token(cfg, dtype)
    seqs = capacity // max_model_len
    log.info(f"{layout.name} cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%d bytes/token); "
             "max concurrent sequences at max_model_len %d: %d (a per-head MHA cache of the same bytes: %d, "
             "%d bytes/token, %.1fx more)",
             num_blocks - 1, block_size, capacity, num_blocks * per_block / GiB, per_token, max_model_len, seqs,
             (capacity * per_token // mha) // max_model_len, mha, mha / per_token)
    return num_blocks, max_model_len


__all__ = ["CacheLayout", "LatentCache", "LatentFp8Cache", "PerHeadCache", "PagedLatentFp8Attention", "LAYOUTS",
           "FP8_LAYOUTS", "cache_layout", "check_servable", "plan_cache", "activation_bytes_per_token"]
