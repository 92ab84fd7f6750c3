"""Decode attention over a per-head paged K/V cache (Triton): the MHA baseline's kernel.

What an MHA model of the same shape would read per token: k [H, N+R] and v [H, V] for every head.
One program per (head, piece of sequence, sequence), so each cached row is read by exactly one
program; the pieces merge by log-sum-exp exactly as the latent kernel's do (mla_decode.merge_splits).
"""
from types import MappingProxyType

import torch

from ._triton import jit, new_buffer, pdl_launch, sm_count, tl, triton, use_triton, wait_for_inputs
from .mla_decode import LOG2E, merge_splits, past_the_end, split_outputs, split_range
from .reference import mha_decode_ref


@jit
def _mha_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_k_blk, stride_k_tok, stride_k_h, stride_v_blk, stride_v_tok, stride_v_h,
    stride_bt, stride_ob, stride_oh, stride_os, H, qk_scale,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    # One head of one sequence per program: each K/V row of the cache is read by exactly one program.
    h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    start, end, _ = split_range(seq_lens_ptr, b, split, NUM_SPLITS, BLOCK_N)
    if past_the_end(start, end, split):
        return

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

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + split * stride_os + offs_dv,
             (acc / l_safe).to(o_ptr.dtype.element_ty), mask=mask_dv)
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + (b * H + h) * NUM_SPLITS + split, lse)


# Defaults, the best of a 5-point sweep on an H100 at V2-Lite shapes, batch 32, L=4,096 (results/mla_vs_mha.md):
# 64 tokens per tile, 4 warps, splits sized for 4 programs per multiprocessor. The benchmark re-tunes in each
# run and hands its choice to the engine (engine.PerHeadCache(decode_tuning=...)); read-only.
TUNING = MappingProxyType({"block_n": 64, "num_warps": 4, "ctas_per_sm": 4, "min_tokens_per_split": 256})


def mha_decode_triton(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, num_splits: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None, ctas_per_sm: int | None = None,
                      min_tokens_per_split: int | None = None) -> torch.Tensor:
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
        want = max(1, (ctas_per_sm or TUNING["ctas_per_sm"]) * sm_count(q.device) // (B * H))
        min_tokens = min_tokens_per_split or TUNING["min_tokens_per_split"]
        num_splits = min(want, max(1, block_table.shape[1] * PAGE // min_tokens), 64)
    out = new_buffer((B, H, DV), q.dtype, q.device)
    o_part, lse, so = split_outputs(out, num_splits)
    _mha_decode_split_kernel[(H, num_splits, B)](
        q, k_cache, v_cache, block_table, seq_lens, o_part, lse,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        block_table.stride(0), *so, H, softmax_scale * LOG2E,
        DK=DK, DV=DV, BLOCK_DK=triton.next_power_of_2(DK), BLOCK_DV=triton.next_power_of_2(DV),
        PAGE=PAGE, BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=num_warps, **pdl_launch(q))
    if num_splits > 1:
        merge_splits(o_part, lse, out, seq_lens, block_n)
    return out


def mha_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, softmax_scale: float, **tuning) -> torch.Tensor:
    """Paged decode attention over per-head K/V: q [B,H,Dk], k_cache [NB,BS,H,Dk], v_cache [NB,BS,H,Dv] -> [B,H,Dv].

    Triton on CUDA (CPU under TRITON_INTERPRET=1), `mha_decode_ref` elsewhere. `tuning` (num_splits,
    block_n, num_warps, ctas_per_sm, min_tokens_per_split; defaults in TUNING) reaches the Triton path only.
    """
    if use_triton(q):
        return mha_decode_triton(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, **tuning)
    return mha_decode_ref(q, k_cache, v_cache, block_table, seq_lens, softmax_scale)


__all__ = ["mha_decode", "mha_decode_triton", "TUNING"]
