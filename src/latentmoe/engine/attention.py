"""The paged caches as the model's AttentionBackend: the step's metadata, and one backend per cache layout.

A step's tokens arrive flattened (decodes first, then prefill chunks). Every new token is written
to its slot; decodes attend over the paged cache with the layout's decode kernel. All prefill chunks
of the step go through one batched call per layer: their contexts (cached prefix + chunk) are
gathered in one index, decompressed in one GEMM, and kernels.prefill_attention attends every chunk
at once (variable lengths, full over the prefix, causal inside the chunk; no mask tensor).

Latent (MLA): per layer kv_cache [NB, BS, C + R], row = [c_kv | k_pe]; decode is absorbed attention
(q_lat = W_UK^T q_nope, an MQA over the latent rows, W_UV applied after). Per-head (the MHA
baseline): per layer k_cache [NB, BS, H, N + R] (k_nope decompressed by W_UK, the shared rotated
k_pe repeated per head) and v_cache [NB, BS, H, V], written once per token, read once per decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels


@dataclass
class PrefillMetadata:
    """The step's prefill chunks, in row order after the decodes (chunk p: query rows cu_q[p]:cu_q[p+1]
    of the prefill rows, context = keys cu_k[p]:cu_k[p+1] of ctx_slots, its cached prefix then itself)."""
    ctx_slots: torch.Tensor     # [S] int64: cache slots of every chunk's context, chunk after chunk
    cu_q: torch.Tensor          # [P+1] int32
    cu_k: torch.Tensor          # [P+1] int32
    max_q: int                  # the longest chunk (sizes the kernel's launch)
    max_k: int                  # the longest context (prefix + chunk)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor              # [M] int64
    num_decodes: int = 0
    block_table: torch.Tensor | None = None  # [num_decodes, MB] int32
    seq_lens: torch.Tensor | None = None     # [num_decodes] int32, incl. the new token
    prefill: PrefillMetadata | None = None


class PagedAttention:
    """The model's AttentionBackend over per-layer paged caches (one entry of `kv_caches` per layer).

    `meta` is set by the runner for each step. A layout's backend says how new tokens are written
    (`write`) and how decodes and prefill chunks read its cache (`decode`, `prefill`).
    """

    def __init__(self, kv_caches: list):
        self.kv_caches = kv_caches
        self.meta: AttentionMetadata | None = None

    def attend(self, layer, q_nope, q_pe, c_kv, k_pe, written: bool = False, q_lat: torch.Tensor | None = None):
        """The attention output of the step's tokens. `written`: their rows are already in the cache (the
        caller stored them through `write_target`), else they are written here first. `q_lat`: the decodes'
        absorbed queries, computed by the caller (`absorb_rows`), else here."""
        meta = self.meta
        B, T, H, _ = q_nope.shape
        M = B * T
        q_nope, q_pe = q_nope.reshape(M, H, -1), q_pe.reshape(M, H, -1)
        cache = self.kv_caches[layer.layer_idx]
        if not written:
            self.write(layer, cache, meta.slot_mapping, c_kv.reshape(M, -1), k_pe.reshape(M, -1))
        nd = meta.num_decodes
        outs = []
        if nd:
            outs.append(self.decode(layer, cache, q_nope[:nd], q_pe[:nd], meta.block_table, meta.seq_lens, q_lat))
        if meta.prefill is not None:
            outs.append(self.prefill(layer, cache, q_nope[nd:], q_pe[nd:], meta.prefill))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return o.view(B, T, H, -1)

    def write_target(self, layer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(latent cache [NB, BS, C+R], slot_mapping) for a caller that stores the new rows itself, as
        write_latent_cache would, in the kernel that produces them (kernels.mla_post_projection): one
        launch a layer fewer. None where this layout's rows are stored otherwise."""
        return None

    def absorb_rows(self, layer) -> int:
        """How many of the step's first rows (its decodes) want absorbed queries q_lat = W_UK^T q_nope, which
        a caller may compute in the kernel that produces q_nope's neighbours (kernels.mla_post_projection) and
        hand to `attend`: one launch a layer fewer at batch-1 decode. 0 where this layout has no use for them."""
        return 0

    def write(self, layer, cache, slot_mapping, c_kv, k_pe) -> None:
        raise NotImplementedError

    def decode(self, layer, cache, q_nope, q_pe, block_table, seq_lens, q_lat=None) -> torch.Tensor:
        """[nd, H, N], [nd, H, R] -> [nd, H, V]: one new token per sequence over its paged cache (`q_lat`: see
        `attend`)."""
        raise NotImplementedError

    def prefill(self, layer, cache, q_nope, q_pe, meta: PrefillMetadata) -> torch.Tensor:
        """[T, H, N], [T, H, R] -> [T, H, V]: every chunk over its cached prefix and itself."""
        raise NotImplementedError


class PagedLatentAttention(PagedAttention):
    """Over the latent cache: kv_caches[layer] = [NB, BS, C + R]."""

    def write_target(self, layer):
        return self.kv_caches[layer.layer_idx], self.meta.slot_mapping

    def absorb_rows(self, layer) -> int:
        return self.meta.num_decodes

    def write(self, layer, cache, slot_mapping, c_kv, k_pe) -> None:
        kernels.write_latent_cache(cache, slot_mapping, c_kv, k_pe)

    def decode(self, layer, cache, q_nope, q_pe, block_table, seq_lens, q_lat=None):
        rows, scales = self.rows_and_scales(cache)
        # W_UK and W_UV per head (kernels.per_head_matmul), the result in [nd, H, .] order: o_proj's flatten then
        # reads it as is (an einsum's transposed view cost a copy kernel every layer). Merging the split-KV
        # pieces inside W_UV's product (one launch fewer) measured slower at every batch-1/2 point: H200, V2-Lite
        # shape, graph sized for 128K, B=1 at 1K 2.51 against 2.41 ms a step, B=2 3.91 against 3.44, B=1 at
        # 128K 4.20 against 3.94 (each program re-reads all the pieces of its head), so it was not kept.
        if q_lat is None:
            q_lat = kernels.per_head_matmul(q_nope, layer.w_uk)
        o_lat = kernels.mla_decode(q_lat, q_pe, rows, block_table, seq_lens, layer.softmax_scale, kv_scale=scales)
        return kernels.per_head_matmul(o_lat, layer.w_uv.transpose(1, 2))

    def prefill(self, layer, cache, q_nope, q_pe, meta):
        # Every chunk's context decompressed in one GEMM (the prefix once per step, not per chunk).
        C, H, N = layer.kv_lora_rank, layer.n_heads, layer.nope_dim
        kv = self.context_rows(layer, cache, meta.ctx_slots, q_nope.dtype)   # [S, C+R]
        k_nope, v = layer.kv_b_proj(kv[:, :C]).view(-1, H, N + layer.v_dim).split([N, layer.v_dim], dim=-1)
        return kernels.prefill_attention(q_nope, q_pe, k_nope, kv[:, C:], v, meta.cu_q, meta.cu_k, meta.max_q,
                                         layer.softmax_scale, max_k=meta.max_k)

    # What a quantised latent cache (engine/kv_cache.py) changes: how its rows are stored.
    @staticmethod
    def rows_and_scales(cache):
        """(rows [NB, BS, C+R], their scales or None) as the decode kernel reads them."""
        return cache, None

    @staticmethod
    def context_rows(layer, cache, slots, dtype):
        """The rows at `slots`, [S, C+R], in the model's dtype."""
        return cache.view(-1, cache.shape[-1])[slots]


class PagedPerHeadAttention(PagedAttention):
    """Over per-head K/V: kv_caches[layer] = (k_cache [NB, BS, H, N+R], v_cache [NB, BS, H, V]).
    `decode_tuning` reaches kernels.mha_decode (the benchmark hands its own sweep's choice)."""

    def __init__(self, kv_caches: list, decode_tuning: dict | None = None):
        super().__init__(kv_caches)
        self.decode_tuning = dict(decode_tuning or {})

    def write(self, layer, cache, slot_mapping, c_kv, k_pe) -> None:
        # Decompress the new tokens once, as an MHA model's K/V projections would produce them.
        k_cache, v_cache = cache
        M, H, N, R, V = c_kv.shape[0], layer.n_heads, layer.nope_dim, layer.rope_dim, layer.v_dim
        k_nope, v = layer.kv_b_proj(c_kv).view(M, H, N + V).split([N, V], dim=-1)
        k = torch.cat([k_nope, k_pe.reshape(M, 1, R).expand(M, H, R)], dim=-1)
        k_cache.view(-1, H, N + R).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, H, V).index_copy_(0, slot_mapping, v.to(v_cache.dtype))

    def decode(self, layer, cache, q_nope, q_pe, block_table, seq_lens, q_lat=None):
        k_cache, v_cache = cache
        q = torch.cat([q_nope, q_pe], dim=-1)
        return kernels.mha_decode(q, k_cache, v_cache, block_table, seq_lens, layer.softmax_scale, **self.decode_tuning)

    def prefill(self, layer, cache, q_nope, q_pe, meta):
        k_cache, v_cache = cache
        H, N = layer.n_heads, layer.nope_dim
        kc = k_cache.view(-1, H, k_cache.shape[-1])[meta.ctx_slots]     # [S, H, N+R]
        vc = v_cache.view(-1, H, v_cache.shape[-1])[meta.ctx_slots]     # [S, H, V]
        return kernels.prefill_attention(q_nope.contiguous(), q_pe.contiguous(), kc[..., :N], kc[..., N:], vc,
                                         meta.cu_q, meta.cu_k, meta.max_q, layer.softmax_scale, max_k=meta.max_k)


__all__ = ["AttentionMetadata", "PrefillMetadata", "PagedAttention", "PagedLatentAttention", "PagedPerHeadAttention"]
