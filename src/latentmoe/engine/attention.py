"""The paged caches as the model's AttentionBackend: the step's metadata, and one backend per cache layout.

A step's tokens arrive flattened (decodes first, then prefill chunks). Every new token is written
to its slot; decodes attend over the paged cache with the layout's decode kernel, prefill chunks
rebuild per-head K/V for the cached prefix + the chunk and run ordinary causal attention.

Latent (MLA): per layer kv_cache [NB, BS, C + R], row = [c_kv | k_pe]; decode is absorbed attention
(q_lat = W_UK^T q_nope, an MQA over the latent rows, W_UV applied after). Per-head (the MHA
baseline): per layer k_cache [NB, BS, H, N + R] (k_nope decompressed by W_UK, the shared rotated
k_pe repeated per head) and v_cache [NB, BS, H, V], written once per token, read once per decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import kernels


@dataclass
class PrefillChunk:
    start: int                  # first row of the chunk in the flattened batch
    length: int                 # query tokens in this chunk
    ctx_slots: torch.Tensor     # [S] int64 cache slots of tokens 0..S-1 (prefix + chunk)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor              # [M] int64
    num_decodes: int = 0
    block_table: torch.Tensor | None = None  # [num_decodes, MB] int32
    seq_lens: torch.Tensor | None = None     # [num_decodes] int32, incl. the new token
    prefills: list[PrefillChunk] = field(default_factory=list)


def chunk_causal_mask(Tq: int, S: int, device) -> torch.Tensor | None:
    """A chunk's Tq queries are the last of S positions: query i (position S-Tq+i) sees keys 0..S-Tq+i.
    [Tq, S] bool, or None when the chunk is the whole context (plain causal)."""
    return None if S == Tq else torch.ones(Tq, S, dtype=torch.bool, device=device).tril(S - Tq)


class PagedAttention:
    """The model's AttentionBackend over per-layer paged caches (one entry of `kv_caches` per layer).

    `meta` is set by the runner for each step. A layout's backend says how new tokens are written
    (`write`) and how decodes and prefill chunks read its cache (`decode`, `prefill`).
    """

    def __init__(self, kv_caches: list):
        self.kv_caches = kv_caches
        self.meta: AttentionMetadata | None = None

    def attend(self, layer, q_nope, q_pe, c_kv, k_pe):
        meta = self.meta
        B, T, H, _ = q_nope.shape
        M = B * T
        q_nope, q_pe = q_nope.reshape(M, H, -1), q_pe.reshape(M, H, -1)
        cache = self.kv_caches[layer.layer_idx]
        self.write(layer, cache, meta.slot_mapping, c_kv.reshape(M, -1), k_pe.reshape(M, -1))
        nd = meta.num_decodes
        outs = []
        if nd:
            outs.append(self.decode(layer, cache, q_nope[:nd], q_pe[:nd], meta.block_table, meta.seq_lens))
        for chunk in meta.prefills:
            s, e = chunk.start, chunk.start + chunk.length
            outs.append(self.prefill(layer, cache, q_nope[s:e], q_pe[s:e], chunk.ctx_slots))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return o.view(B, T, H, -1)

    def write(self, layer, cache, slot_mapping, c_kv, k_pe) -> None:
        raise NotImplementedError

    def decode(self, layer, cache, q_nope, q_pe, block_table, seq_lens) -> torch.Tensor:
        """[nd, H, N], [nd, H, R] -> [nd, H, V]: one new token per sequence over its paged cache."""
        raise NotImplementedError

    def prefill(self, layer, cache, q_nope, q_pe, ctx_slots) -> torch.Tensor:
        """[Tq, H, N], [Tq, H, R] -> [Tq, H, V]: a chunk over the cached prefix and itself."""
        raise NotImplementedError


class PagedLatentAttention(PagedAttention):
    """Over the latent cache: kv_caches[layer] = [NB, BS, C + R]."""

    def write(self, layer, cache, slot_mapping, c_kv, k_pe) -> None:
        kernels.write_latent_cache(cache, slot_mapping, c_kv, k_pe)

    def decode(self, layer, cache, q_nope, q_pe, block_table, seq_lens):
        q_lat = torch.einsum("bhn,hnc->bhc", q_nope, layer.w_uk)
        o_lat = kernels.mla_decode(q_lat, q_pe, cache, block_table, seq_lens, layer.softmax_scale)
        return torch.einsum("bhc,hvc->bhv", o_lat, layer.w_uv)

    def prefill(self, layer, cache, q_nope, q_pe, ctx_slots):
        C = layer.kv_lora_rank
        kv = cache.view(-1, cache.shape[-1])[ctx_slots][None]          # [1, S, C+R]
        mask = chunk_causal_mask(q_nope.shape[0], kv.shape[1], kv.device)
        o = layer.attend_decompressed(q_nope[None], q_pe[None], kv[..., :C], kv[..., C:],
                                      None if mask is None else mask[None, None])
        return o[0]


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

    def decode(self, layer, cache, q_nope, q_pe, block_table, seq_lens):
        k_cache, v_cache = cache
        q = torch.cat([q_nope, q_pe], dim=-1)
        return kernels.mha_decode(q, k_cache, v_cache, block_table, seq_lens, layer.softmax_scale, **self.decode_tuning)

    def prefill(self, layer, cache, q_nope, q_pe, ctx_slots):
        k_cache, v_cache = cache
        H = layer.n_heads
        kc = k_cache.view(-1, H, k_cache.shape[-1])[ctx_slots]          # [S, H, N+R]
        vc = v_cache.view(-1, H, v_cache.shape[-1])[ctx_slots]          # [S, H, V]
        q = torch.cat([q_nope, q_pe], dim=-1)
        Tq = q.shape[0]
        mask = chunk_causal_mask(Tq, kc.shape[0], q.device)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), kc.transpose(0, 1), vc.transpose(0, 1),
                                           attn_mask=mask, is_causal=mask is None and Tq > 1,
                                           scale=layer.softmax_scale)
        return o.transpose(0, 1)                                        # [Tq, H, V]


__all__ = ["AttentionMetadata", "PrefillChunk", "PagedAttention", "PagedLatentAttention", "PagedPerHeadAttention",
           "chunk_causal_mask"]
