"""Routed experts with block-FP8 weights: the fused-MoE grouped GEMMs (kernels/moe.py) reading e4m3 tiles.

Same row layout (moe_align / few_token_layout), same tiles and epilogues as `fused_moe`; each weight
tile is loaded as fp8 (half the bytes of bf16: decode reads little else), converted to x's dtype in
registers and its 128-deep partial product scaled by the tile's scale. Activations stay in x's dtype.

gate_up_proj [E, 2I, D] e4m3 with gate_up_scale [E, ceil(2I/128), ceil(D/128)], down_proj [E, D, I]
with down_scale [E, ceil(D/128), ceil(I/128)]: the stacked [gate | up] rows are quantised as one
matrix (the same scales as quantising gate and up apart when I is a multiple of 128, as in every
released model). Legend as in moe.py.
"""
import torch

from ._triton import INTERPRET, dot, jit, new_buffer, tl, triton, use_triton
from .fp8 import BLOCK, dequantize_fp8_blocks, dequantize_fp8_blocks_triton
from .moe import DECODE_CONFIG, FEW_TOKENS, choose_moe_config, fused_moe_triton, moe_align, moe_combine
from .reference import fused_moe_ref


def fused_moe_fp8_ref(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK, topk_weight_MK):
    """The definition: the dequantised weights through the fp32 expert-by-expert reference."""
    return fused_moe_ref(x_MD, dequantize_fp8_blocks(gate_up_proj, gate_up_scale),
                         dequantize_fp8_blocks(down_proj, down_scale), topk_idx_MK, topk_weight_MK)


@jit
def _moe_fp8_gate_up_kernel(x_ptr, w_ptr, s_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr,
                            stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm, A, D, I, E,
                            TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """h[p, n] = silu(x[tok(p)] . w_gate[e, n]) * (x[tok(p)] . w_up[e, n]), weights dequantised per tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < E:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ids_ptr + offs_m)
        valid = ids < A
        tok = (ids // TOP_K).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < I
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
        wg_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        wu_ptrs = wg_ptrs + I * stride_wn
        sg_ptrs = s_ptr + e * stride_se + (offs_n // SCALE_BLOCK) * stride_sn
        su_ptrs = s_ptr + e * stride_se + ((I + offs_n) // SCALE_BLOCK) * stride_sn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            mask_k = offs_k < D - k0
            xa = tl.load(x_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            sg = tl.load(sg_ptrs + k0 // SCALE_BLOCK, mask=mask_n, other=0.0)
            su = tl.load(su_ptrs + k0 // SCALE_BLOCK, mask=mask_n, other=0.0)
            # Scale folded into the dequantised tile, so the dots accumulate in place (scaling each dot's
            # result instead needs a second pair of 128x128 accumulators: register spills at prefill tiles).
            acc_g += dot(xa, (wg.to(tl.float32) * sg[None, :]).to(xa.dtype), UPCAST)
            acc_u += dot(xa, (wu.to(tl.float32) * su[None, :]).to(xa.dtype), UPCAST)
            x_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=mask_n[None, :])


@jit
def _moe_fp8_down_kernel(h_ptr, w_ptr, s_ptr, y_ptr, sorted_ids_ptr, block_expert_ptr, topk_weight_ptr,
                         stride_hm, stride_we, stride_wn, stride_se, stride_sn, stride_ym, A, I, D, E,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SCALE_BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """y[id(p), n] = weight[id(p)] * (h[p] . w_down[e, n]), weights dequantised per tile."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if e < E:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ids_ptr + offs_m)
        valid = ids < A
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
        w_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]   # [BLOCK_K, BLOCK_N]
        s_ptrs = s_ptr + e * stride_se + (offs_n // SCALE_BLOCK) * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            mask_k = offs_k < I - k0
            ha = tl.load(h_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            s = tl.load(s_ptrs + k0 // SCALE_BLOCK, mask=mask_n, other=0.0)
            acc += dot(ha, (w.to(tl.float32) * s[None, :]).to(ha.dtype), UPCAST)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        wt = tl.load(topk_weight_ptr + ids, mask=valid, other=0.0).to(tl.float32)
        tl.store(y_ptr + ids[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                 (acc * wt[:, None]).to(y_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


def fused_moe_fp8_triton(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK, topk_weight_MK,
                         few_token_layout: torch.Tensor | None = None, config: dict | None = None,
                         add_MD: torch.Tensor | None = None) -> torch.Tensor:
    M, D = x_MD.shape
    K = topk_idx_MK.shape[1]
    E, I = down_proj.shape[0], down_proj.shape[2]
    A = M * K
    assert gate_up_proj.shape == (E, 2 * I, D) and down_proj.shape == (E, D, I)
    assert gate_up_proj.stride(-1) == 1 and down_proj.stride(-1) == 1
    x_MD = x_MD if x_MD.stride(-1) == 1 else x_MD.contiguous()
    if few_token_layout is not None and M <= FEW_TOKENS:
        cfg = DECODE_CONFIG
        assert few_token_layout.numel() >= A * cfg["block_m"], "the layout was built for fewer assignments"
        sorted_ids, block_expert = few_token_layout, topk_idx_MK.reshape(-1)   # block a = assignment a
    else:
        cfg = config or choose_moe_config(A, E)
        sorted_ids, block_expert = moe_align(topk_idx_MK, E, cfg["block_m"])
    bm, bk, nw, ns = cfg["block_m"], cfg["block_k"], cfg["num_warps"], cfg["num_stages"]
    assert BLOCK % bk == 0, "a K tile must lie inside one scale block"
    n_blocks = block_expert.numel()
    h_PI = new_buffer((n_blocks * bm, I), x_MD.dtype, x_MD.device)
    _moe_fp8_gate_up_kernel[(triton.cdiv(I, cfg["block_n1"]), n_blocks)](
        x_MD, gate_up_proj, gate_up_scale, h_PI, sorted_ids, block_expert,
        x_MD.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_scale.stride(0),
        gate_up_scale.stride(1), h_PI.stride(0), A, D, I, E,
        TOP_K=K, BLOCK_M=bm, BLOCK_N=cfg["block_n1"], BLOCK_K=bk, SCALE_BLOCK=BLOCK, UPCAST=INTERPRET,
        num_warps=nw, num_stages=ns)
    y_AD = new_buffer((A, D), x_MD.dtype, x_MD.device)
    weight_A = topk_weight_MK.reshape(-1).contiguous()
    _moe_fp8_down_kernel[(triton.cdiv(D, cfg["block_n2"]), n_blocks)](
        h_PI, down_proj, down_scale, y_AD, sorted_ids, block_expert, weight_A,
        h_PI.stride(0), down_proj.stride(0), down_proj.stride(1), down_scale.stride(0), down_scale.stride(1),
        y_AD.stride(0), A, I, D, E,
        BLOCK_M=bm, BLOCK_N=cfg["block_n2"], BLOCK_K=bk, SCALE_BLOCK=BLOCK, UPCAST=INTERPRET,
        num_warps=nw, num_stages=ns)
    return moe_combine(y_AD, K, add_MD)


# From this many assignments per expert (prefill) the expert GEMMs are compute-bound: the weights are
# dequantised once (one bandwidth-bound pass) and the bf16 fused-MoE kernels run. On an H200 the FP8
# kernels measured 1.19x the bf16 ones at 1 token, 0.99x at 256, 0.36x at 8192 (benchmarks/results/fp8.md).
DEQUANTIZE_MIN_PER_EXPERT = 256


def _dequantize_experts(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """[E, N, K] e4m3 + [E, N/128, K/128] scales -> [E, N, K] in `dtype` in one kernel (None unless N % 128 == 0,
    where the stacked experts are one [E*N, K] matrix of whole tiles)."""
    E, N, K = w.shape
    if N % BLOCK or not w.is_contiguous():
        return None
    return dequantize_fp8_blocks_triton(w.view(E * N, K), s.reshape(-1, s.shape[-1]), dtype).view(E, N, K)


def fused_moe_fp8(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor,
                  down_proj: torch.Tensor, down_scale: torch.Tensor, topk_idx_MK: torch.Tensor,
                  topk_weight_MK: torch.Tensor, few_token_layout: torch.Tensor | None = None,
                  add_MD: torch.Tensor | None = None) -> torch.Tensor:
    """`fused_moe` over block-FP8 expert weights -> [M, D] in x's dtype. Triton on CUDA (CPU under
    TRITON_INTERPRET=1): the FP8 kernels, or from DEQUANTIZE_MIN_PER_EXPERT assignments per expert the
    dequantised weights through the bf16 kernels; the dequantising reference elsewhere. `add_MD` as in
    `fused_moe`."""
    if x_MD.shape[0] == 0:
        return x_MD.clone()
    if not use_triton(x_MD):
        y = fused_moe_fp8_ref(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK, topk_weight_MK)
        return y if add_MD is None else y + add_MD
    if topk_idx_MK.numel() >= DEQUANTIZE_MIN_PER_EXPERT * gate_up_proj.shape[0]:
        gu = _dequantize_experts(gate_up_proj, gate_up_scale, x_MD.dtype)
        dn = _dequantize_experts(down_proj, down_scale, x_MD.dtype) if gu is not None else None
        if dn is not None:
            return fused_moe_triton(x_MD, gu, dn, topk_idx_MK, topk_weight_MK, add_MD=add_MD)
    return fused_moe_fp8_triton(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK,
                                topk_weight_MK, few_token_layout, add_MD=add_MD)


__all__ = ["fused_moe_fp8", "fused_moe_fp8_ref", "fused_moe_fp8_triton", "DEQUANTIZE_MIN_PER_EXPERT"]
