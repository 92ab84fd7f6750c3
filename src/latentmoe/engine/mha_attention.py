"""A per-head K/V cache as the engine's AttentionBackend: what an MHA model of the same shape would cache.

The baseline for the MLA-vs-MHA comparison. Per layer two tensors, k_cache [NB, BS, H, N+R] (k_nope
decompressed by W_UK, then the shared rotated k_pe repeated per head) and v_cache [NB, BS, H, V],
written once per token. Decode reads each cached byte once in a Triton split-KV kernel (one program
per head and piece of sequence, log-sum-exp merge); prefill gathers the context's K/V and runs SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels._triton import jit, new_buffer, sm_count, tl, triton, use_triton
from ..kernels.mla_decode import _mla_decode_merge_kernel

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- torch reference
def mha_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """q [B,H,Dk], k_cache [NB,BS,H,Dk], v_cache [NB,BS,H,Dv] -> o [B,H,Dv]; positions >= seq_lens masked, fp32 softmax."""
    B, H, _ = q.shape
    k = k_cache[block_table.long()].flatten(1, 2)                    # [B, S, H, Dk]
    v = v_cache[block_table.long()].flatten(1, 2)                    # [B, S, H, Dv]
    scores = torch.einsum("bhd,bshd->bhs", q.float(), k.float()) * softmax_scale
    pos = torch.arange(k.shape[1], device=q.device)
    scores = scores.masked_fill((pos[None, :] >= seq_lens[:, None])[:, None, :], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v.float()).to(q.dtype)


# ----------------------------------------------------------------------------- Triton decode
@jit
def _mha_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_k_blk, stride_k_tok, stride_k_h, stride_v_blk, stride_v_tok, stride_v_h,
    stride_bt, stride_ob, stride_oh, stride_os, H, qk_scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    # One head of one sequence per program: each K/V row of the cache is read by exactly one program.
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dk = offs_dk < DK
    mask_dv = offs_dv < DV
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_dk, mask=mask_dk, other=0.0).to(tl.float32)

    # Running max (log2 units) and sum of exp2: fp32 scalars (made by reductions, so their type is fixed).
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(block_table_ptr + b * stride_bt + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
        slot = offs_n % PAGE
        k = tl.load(k_ptr + (page * stride_k_blk + slot * stride_k_tok + h * stride_k_h)[:, None] + offs_dk[None, :],
                    mask=mask_n[:, None] & mask_dk[None, :], other=0.0)             # [BLOCK_N, BLOCK_DK]
        v = tl.load(v_ptr + (page * stride_v_blk + slot * stride_v_tok + h * stride_v_h)[:, None] + offs_dv[None, :],
                    mask=mask_n[:, None] & mask_dv[None, :], other=0.0)             # [BLOCK_N, BLOCK_DV]
        # One query row per head: a GEMV, memory-bound, so no tensor cores needed.
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale
        s = tl.where(mask_n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new

    # An empty piece (sequence shorter than the split count) leaves o = 0 and lse = -inf.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + split * stride_os + offs_dv,
             (acc / l_safe).to(o_ptr.dtype.element_ty), mask=mask_dv)
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + (b * H + h) * NUM_SPLITS + split, lse)


# Best of a 5-point sweep on an H100 at V2-Lite shapes, batch 32, L=4,096 (results/mla_vs_mha.md): 64 tokens
# per tile, 4 warps, splits sized for 4 programs per multiprocessor. The benchmark re-tunes in each run.
TUNING = {"block_n": 64, "num_warps": 4, "ctas_per_sm": 4, "min_tokens_per_split": 256}


def mha_decode_triton(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, num_splits: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    B, H, DK = q.shape
    NB, PAGE, _, DV = v_cache.shape
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and block_table.stride(-1) == 1
    assert block_table.dtype == torch.int32 and seq_lens.dtype == torch.int32
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_n = block_n or TUNING["block_n"]
    num_warps = num_warps or TUNING["num_warps"]
    if num_splits is None:
        # No host sync: pieces from the block table's width (its longest possible sequence), as many
        # as fill about one wave of programs.
        want = max(1, TUNING["ctas_per_sm"] * sm_count(q.device) // (B * H))
        num_splits = min(want, max(1, block_table.shape[1] * PAGE // TUNING["min_tokens_per_split"]), 64)
    out = new_buffer((B, H, DV), q.dtype, q.device)
    if num_splits == 1:
        o_part, lse, so = out, out, (out.stride(0), out.stride(1), 0)
    else:
        o_part = new_buffer((B, H, num_splits, DV), torch.float32, q.device)
        lse = new_buffer((B, H, num_splits), torch.float32, q.device)
        so = o_part.stride()[:3]
    _mha_decode_split_kernel[(H, num_splits, B)](
        q, k_cache, v_cache, block_table, seq_lens, o_part, lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_table.stride(0), *so, H, softmax_scale * LOG2E,
        DK=DK, DV=DV, BLOCK_DK=triton.next_power_of_2(DK), BLOCK_DV=triton.next_power_of_2(DV),
        PAGE=PAGE, BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=num_warps)
    if num_splits > 1:
        # The pieces merge exactly as the latent kernel's do (log-sum-exp weights over [B, H, S, DV] partials).
        _mla_decode_merge_kernel[(B * H,)](
            o_part, lse, out, out.stride(0), out.stride(1), H, C=DV, BLOCK_C=triton.next_power_of_2(DV),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4)
    return out


def mha_decode(q, k_cache, v_cache, block_table, seq_lens, softmax_scale) -> torch.Tensor:
    """Paged decode attention over per-head K/V: Triton on CUDA (or CPU under TRITON_INTERPRET=1), torch elsewhere."""
    if use_triton(q):
        return mha_decode_triton(q, k_cache, v_cache, block_table, seq_lens, softmax_scale)
    return mha_decode_torch(q, k_cache, v_cache, block_table, seq_lens, softmax_scale)


# ----------------------------------------------------------------------------- backend
class PagedMHAAttention:
    """The model's AttentionBackend over per-layer paged K/V caches; reads the engine's AttentionMetadata."""

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv_caches = kv_caches
        self.meta = None

    @classmethod
    def allocate(cls, cfg, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> "PagedMHAAttention":
        H, DK, DV = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        return cls([(torch.zeros(num_blocks, block_size, H, DK, dtype=dtype, device=device),
                     torch.zeros(num_blocks, block_size, H, DV, dtype=dtype, device=device))
                    for _ in range(cfg.num_hidden_layers)])

    def attend(self, layer, q_nope, q_pe, c_kv, k_pe):
        meta = self.meta
        B, T, H, N = q_nope.shape
        M, R = B * T, q_pe.shape[-1]
        k_cache, v_cache = self.kv_caches[layer.layer_idx]
        # Decompress the new tokens once, as an MHA model's K/V projections would produce them.
        kv = layer.kv_b_proj(c_kv.reshape(M, -1)).view(M, H, N + layer.v_dim)
        k_nope, v = kv.split([N, layer.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.reshape(M, 1, R).expand(M, H, R)], dim=-1)
        k_flat, v_flat = k_cache.view(-1, H, N + R), v_cache.view(-1, H, layer.v_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_flat.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        q = torch.cat([q_nope, q_pe], dim=-1).reshape(M, H, N + R)
        nd = meta.num_decodes
        outs = []
        if nd:
            outs.append(mha_decode(q[:nd], k_cache, v_cache, meta.block_table, meta.seq_lens, layer.softmax_scale))
        for chunk in meta.prefills:
            s, e = chunk.start, chunk.start + chunk.length
            kc, vc = k_flat[chunk.ctx_slots], v_flat[chunk.ctx_slots]          # [S, H, Dk], [S, H, Dv]
            S, Tq = kc.shape[0], chunk.length
            # Causal, aligned to the end: query i (position S-Tq+i) sees keys 0..S-Tq+i.
            mask = None if S == Tq else torch.ones(Tq, S, dtype=torch.bool, device=q.device).tril(S - Tq)
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), kc.transpose(0, 1), vc.transpose(0, 1),
                                               attn_mask=mask, is_causal=mask is None and Tq > 1,
                                               scale=layer.softmax_scale)
            outs.append(o.transpose(0, 1))                                      # [Tq, H, Dv]
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return o.view(B, T, H, -1)


__all__ = ["PagedMHAAttention", "mha_decode", "mha_decode_torch", "mha_decode_triton", "TUNING"]
