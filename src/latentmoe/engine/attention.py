"""The paged latent cache as the model's AttentionBackend.

Per layer one tensor kv_cache [num_blocks, block_size, C + R], row = [c_kv | k_pe]. A step's tokens
arrive flattened (decodes first, then prefill chunks). Every new token's latent is written to its
slot; decodes use absorbed attention over the paged cache (q_lat = W_UK^T q_nope, MQA over the
576-wide latent, W_UV applied after); prefill chunks rebuild per-head K/V from the cached prefix +
the chunk and run ordinary causal attention. `mla_decode` / `write_latent_cache` below are the one
switch between the Triton kernels (CUDA, when `latentmoe.kernels` is importable) and torch.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field

import torch


# ----------------------------------------------------------------------------- torch reference
def write_latent_cache_torch(kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                             c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """kv_cache [NB, BS, C+R] <- rows [c_kv | k_pe] at slot_mapping [M] (in place)."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    flat.index_copy_(0, slot_mapping, torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype))


def mla_decode_torch(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Absorbed decode attention over the paged cache: q_lat [B,H,C], q_pe [B,H,R] -> o_lat [B,H,C].

    Gathers each sequence's blocks (block_table [B, MB]) into [B, MB*BS, C+R] and masks positions
    >= seq_lens. Scores and softmax in fp32.
    """
    B, H, C = q_lat.shape
    _, BS, CR = kv_cache.shape
    kv = kv_cache[block_table.long()].view(B, -1, CR)           # [B, S, C+R]
    c_kv, k_pe = kv[..., :C], kv[..., C:]
    scores = (torch.einsum("bhc,bsc->bhs", q_lat, c_kv)
              + torch.einsum("bhr,bsr->bhs", q_pe, k_pe)).float() * softmax_scale
    pos = torch.arange(kv.shape[1], device=kv.device)
    scores = scores.masked_fill((pos[None, :] >= seq_lens[:, None])[:, None, :], float("-inf"))
    p = scores.softmax(dim=-1).to(c_kv.dtype)
    return torch.einsum("bhs,bsc->bhc", p, c_kv).to(q_lat.dtype)


# ----------------------------------------------------------------------------- dispatcher
@functools.lru_cache(maxsize=None)
def _kernels():
    try:
        from latentmoe.kernels import mla_decode, write_latent_cache
    except Exception:  # not built, or Triton missing: the torch path serves
        return None
    if not (callable(mla_decode) and callable(write_latent_cache)):
        return None
    return types.SimpleNamespace(mla_decode=mla_decode, write_latent_cache=write_latent_cache)


IMPL = {"decode": "auto"}   # "auto" | "torch" | "kernels" (tests and benchmarks switch here)


def _use_kernels(t: torch.Tensor) -> bool:
    mode = IMPL["decode"]
    if mode == "torch":
        return False
    k = _kernels()
    if mode == "kernels":
        if k is None:
            raise RuntimeError("latentmoe.kernels is not importable")
        return True
    return k is not None and t.is_cuda


def mla_decode(q_lat, q_pe, kv_cache, block_table, seq_lens, softmax_scale):
    if _use_kernels(q_lat):
        return _kernels().mla_decode(q_lat, q_pe, kv_cache, block_table, seq_lens, softmax_scale)
    return mla_decode_torch(q_lat, q_pe, kv_cache, block_table, seq_lens, softmax_scale)


def write_latent_cache(kv_cache, slot_mapping, c_kv, k_pe):
    if _use_kernels(c_kv):
        return _kernels().write_latent_cache(kv_cache, slot_mapping, c_kv, k_pe)
    return write_latent_cache_torch(kv_cache, slot_mapping, c_kv, k_pe)


# ----------------------------------------------------------------------------- backend
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


class PagedLatentAttention:
    """Implements the model's AttentionBackend over per-layer paged latent caches."""

    def __init__(self, kv_caches: list[torch.Tensor]):
        self.kv_caches = kv_caches
        self.meta: AttentionMetadata | None = None

    def attend(self, layer, q_nope, q_pe, c_kv, k_pe):
        meta = self.meta
        B, T, H, _ = q_nope.shape
        M = B * T
        C = c_kv.shape[-1]
        q_nope, q_pe = q_nope.reshape(M, H, -1), q_pe.reshape(M, H, -1)
        kv_cache = self.kv_caches[layer.layer_idx]
        write_latent_cache(kv_cache, meta.slot_mapping, c_kv.reshape(M, C), k_pe.reshape(M, -1))
        nd = meta.num_decodes
        outs = []
        if nd:
            q_lat = torch.einsum("bhn,hnc->bhc", q_nope[:nd], layer.w_uk)
            o_lat = mla_decode(q_lat, q_pe[:nd], kv_cache, meta.block_table, meta.seq_lens, layer.softmax_scale)
            outs.append(torch.einsum("bhc,hvc->bhv", o_lat, layer.w_uv))
        if meta.prefills:
            flat = kv_cache.view(-1, kv_cache.shape[-1])
            for chunk in meta.prefills:
                s, e = chunk.start, chunk.start + chunk.length
                kv = flat[chunk.ctx_slots][None]                     # [1, S, C+R]
                S, Tq = kv.shape[1], chunk.length
                # Causal, aligned to the end: query i (position S-Tq+i) sees keys 0..S-Tq+i.
                mask = None if S == Tq else torch.ones(Tq, S, dtype=torch.bool, device=kv.device).tril(S - Tq)[None, None]
                o = layer.attend_decompressed(q_nope[None, s:e], q_pe[None, s:e], kv[..., :C], kv[..., C:], mask)
                outs.append(o[0])
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return o.view(B, T, H, -1)


__all__ = ["PagedLatentAttention", "AttentionMetadata", "PrefillChunk", "mla_decode", "write_latent_cache",
           "mla_decode_torch", "write_latent_cache_torch", "IMPL"]
