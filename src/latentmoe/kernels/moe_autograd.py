"""Routed experts for training: the fused grouped-GEMM forward of kernels.moe with a Triton backward.

The forward keeps, per padded assignment row p, the SwiGLU inputs gu = [gate | up] and output h; the
backward is three more grouped GEMMs over the same expert-sorted rows, with no permuted copies:
  1. dh' = dY[tok] @ W_down[e]  (epilogue: d weight = dh' . h, then the SwiGLU backward -> dgu)
  2. dX[a] = dgu @ W_gate_up[e]  (written at the assignment's row, summed over K outside)
  3. dW_gate_up[e] = dgu^T @ X[tok],  dW_down[e] = (w dY[tok])^T @ h, one program per weight tile,
     looping over that expert's rows (experts with no tokens get zeros).
Legend as in kernels.moe: M tokens, K experts per token, A = M*K, E experts, D hidden, I expert width,
P padded rows, NT tiles of I.
"""
import torch

from ._triton import INTERPRET, dot, jit, new_buffer, tl, triton, use_triton
from .moe import choose_moe_config, moe_align, moe_shapes, program_expert, row_block, run_moe_gemms
from .reference import fused_moe_ref


@jit
def _down_swiglu_bwd_kernel(dy_ptr, w_ptr, gu_ptr, h_ptr, weight_ptr, dgu_ptr, dwp_ptr, sorted_ids_ptr,
                            block_expert_ptr, stride_dym, stride_we, stride_wd, stride_gm, stride_hm,
                            stride_dwp, A, D, I, E, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """dh'[p] = dy[tok(p)] @ w_down[e] (tile of I); dwp[tile, id(p)] = dh'.h; dgu[p] = SwiGLU backward of w*dh'."""
    pid_m, pid_n, e = program_expert(block_expert_ptr)
    if e < E:
        offs_m, ids, valid, tok, offs_n, mask_n = row_block(sorted_ids_ptr, pid_m, pid_n, A, I, TOP_K, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        dy_ptrs = dy_ptr + tok[:, None] * stride_dym + offs_k[None, :]
        # w_down[e, d, i] as a [BLOCK_K, BLOCK_N] tile (d along K)
        w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wd + offs_n[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            mask_k = offs_k < D - k0
            g = tl.load(dy_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc += dot(g, w, UPCAST)
            dy_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wd
        rows = offs_m[:, None].to(tl.int64)
        m2 = valid[:, None] & mask_n[None, :]
        h = tl.load(h_ptr + rows * stride_hm + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        # d weight[a] = dy[tok] . (h W_down^T) = (dy[tok] W_down) . h: partial sum over this tile of I.
        tl.store(dwp_ptr + pid_n * stride_dwp + ids, tl.sum(acc * h, axis=1), mask=valid)
        gu_ptrs = gu_ptr + rows * stride_gm + offs_n[None, :]
        gate = tl.load(gu_ptrs, mask=m2, other=0.0).to(tl.float32)
        up = tl.load(gu_ptrs + I, mask=m2, other=0.0).to(tl.float32)
        wt = tl.load(weight_ptr + ids, mask=valid, other=0.0).to(tl.float32)
        dh = acc * wt[:, None]
        sig = tl.sigmoid(gate)
        d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))   # d silu(g)/dg = sig (1 + g (1 - sig))
        d_up = dh * gate * sig
        dgu_ptrs = dgu_ptr + rows * stride_gm + offs_n[None, :]
        tl.store(dgu_ptrs, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask_n[None, :])
        tl.store(dgu_ptrs + I, d_up.to(dgu_ptr.dtype.element_ty), mask=mask_n[None, :])


@jit
def _dx_bwd_kernel(dgu_ptr, w_ptr, dx_ptr, sorted_ids_ptr, block_expert_ptr, stride_gm, stride_we, stride_wk,
                   stride_dxm, A, J, D, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   UPCAST: tl.constexpr):
    """dx[id(p), n] = dgu[p] . w_gate_up[e, :, n] (J = 2I), written at the assignment's own row."""
    pid_m, pid_n, e = program_expert(block_expert_ptr)
    if e < E:
        offs_m, ids, valid, _, offs_n, mask_n = row_block(sorted_ids_ptr, pid_m, pid_n, A, D, 1, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = dgu_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_k[None, :]
        w_ptrs = w_ptr + e * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :]   # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, J, BLOCK_K):
            mask_k = offs_k < J - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc += dot(a, w, UPCAST)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        tl.store(dx_ptr + ids[:, None].to(tl.int64) * stride_dxm + offs_n[None, :],
                 acc.to(dx_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


@jit
def _dw_bwd_kernel(a_ptr, b_ptr, out_ptr, weight_ptr, sorted_ids_ptr, expert_start_ptr,
                   stride_am, stride_bm, stride_oe, stride_or, A, R, C,
                   TOP_K: tl.constexpr, A_GATHER: tl.constexpr, A_SCALE: tl.constexpr, B_GATHER: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """out[e, r, c] = sum over expert e's rows p of a(p)[r] * b(p)[c].

    A row of a (or b) is row tok(p) when A_GATHER (B_GATHER), else row p; A_SCALE multiplies a(p)
    by the routing weight of assignment id(p).
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    n_c = tl.cdiv(C, BLOCK_C)
    offs_r = (pid // n_c) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = offs_r < R
    mask_c = offs_c < C
    first = tl.load(expert_start_ptr + e)
    last = tl.load(expert_start_ptr + e + 1)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for blk in range(first, last):
        offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(sorted_ids_ptr + offs_m)
        valid = ids < A
        tok = (ids // TOP_K).to(tl.int64)
        row_a = tok if A_GATHER else offs_m.to(tl.int64)
        row_b = tok if B_GATHER else offs_m.to(tl.int64)
        a = tl.load(a_ptr + row_a[:, None] * stride_am + offs_r[None, :],
                    mask=valid[:, None] & mask_r[None, :], other=0.0)                # [BLOCK_M, BLOCK_R]
        if A_SCALE:
            wt = tl.load(weight_ptr + ids, mask=valid, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * wt[:, None]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + row_b[:, None] * stride_bm + offs_c[None, :],
                    mask=valid[:, None] & mask_c[None, :], other=0.0)                # [BLOCK_M, BLOCK_C]
        acc += dot(tl.trans(a), b, UPCAST)
    out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + offs_r[:, None] * stride_or + offs_c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])


# Weight-gradient tiles (rows x cols of one expert's weight; the reduction runs over its token rows).
# A config dict may override them with the keys block_r / block_c. H100, 8K and 16K tokens of the
# small and V2-Lite shapes (benchmarks/results/moe_backward.md): 128x128 was fastest in 3 of 4 cases,
# 64x64 slowest in all 4.
DW_CONFIG = dict(block_r=128, block_c=128)


class FusedMoEFunction(torch.autograd.Function):
    """y = fused_moe(x, gate_up_proj, down_proj, topk_idx, topk_weight) with gradients for all but topk_idx.

    All floating inputs but topk_weight share one dtype (the caller casts the weights, so autograd
    casts their gradients back to the master dtype).
    """

    @staticmethod
    def forward(ctx, x_MD, gate_up_proj, down_proj, topk_idx_MK, topk_weight_MK, config=None):
        M, D, K, E, I = moe_shapes(x_MD, gate_up_proj, down_proj, topk_idx_MK)
        A = M * K
        assert gate_up_proj.dtype == down_proj.dtype == x_MD.dtype
        x_MD, gate_up_proj, down_proj = x_MD.contiguous(), gate_up_proj.contiguous(), down_proj.contiguous()
        cfg = config or choose_moe_config(A, E)
        sorted_ids, block_expert = moe_align(topk_idx_MK, E, cfg["block_m"])
        gu_P2I = new_buffer((block_expert.numel() * cfg["block_m"], 2 * I), x_MD.dtype, x_MD.device)
        h_PI, y_AD = run_moe_gemms(x_MD, gate_up_proj, down_proj, topk_weight_MK, sorted_ids, block_expert, cfg, K,
                                   gu_P2I=gu_P2I)
        weight_A = topk_weight_MK.reshape(-1).contiguous()
        ctx.save_for_backward(x_MD, gate_up_proj, down_proj, weight_A, sorted_ids, block_expert, gu_P2I, h_PI)
        ctx.cfg, ctx.weight_shape, ctx.weight_dtype = cfg, topk_weight_MK.shape, topk_weight_MK.dtype
        return y_AD.view(M, K, D).sum(dim=1, dtype=torch.float32).to(x_MD.dtype)

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, gate_up_proj, down_proj, weight_A, sorted_ids, block_expert, gu_P2I, h_PI = ctx.saved_tensors
        cfg = ctx.cfg
        M, D = x_MD.shape
        E, I = down_proj.shape[0], down_proj.shape[2]
        A = weight_A.numel()
        K = A // M
        bm, bk, nw, ns = cfg["block_m"], cfg["block_k"], cfg["num_warps"], cfg["num_stages"]
        n_blocks = block_expert.numel()
        dt, dev = x_MD.dtype, x_MD.device
        dy_MD = dy_MD.to(dt).contiguous()  # autograd may hand an expanded (stride-0) gradient
        need_x, need_gu, need_down, _, need_w, _ = ctx.needs_input_grad

        bn = cfg["block_n1"]
        n_tiles = triton.cdiv(I, bn)
        dgu_P2I = new_buffer(gu_P2I.shape, dt, dev)
        dwp_TA = new_buffer((n_tiles, A), torch.float32, dev)
        _down_swiglu_bwd_kernel[(n_tiles, n_blocks)](
            dy_MD, down_proj, gu_P2I, h_PI, weight_A, dgu_P2I, dwp_TA, sorted_ids, block_expert,
            dy_MD.stride(0), down_proj.stride(0), down_proj.stride(1), gu_P2I.stride(0), h_PI.stride(0),
            dwp_TA.stride(0), A, D, I, E, TOP_K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, UPCAST=INTERPRET,
            num_warps=nw, num_stages=ns)
        d_weight = dwp_TA.sum(0).view(ctx.weight_shape).to(ctx.weight_dtype) if need_w else None

        d_x = None
        if need_x:
            dx_AD = new_buffer((A, D), dt, dev)
            # The forward's down tile was measured up to 256 columns for the forward only; dx keeps 128.
            bn_dx = min(cfg["block_n2"], 128)
            _dx_bwd_kernel[(triton.cdiv(D, bn_dx), n_blocks)](
                dgu_P2I, gate_up_proj, dx_AD, sorted_ids, block_expert, dgu_P2I.stride(0), gate_up_proj.stride(0),
                gate_up_proj.stride(1), dx_AD.stride(0), A, 2 * I, D, E, BLOCK_M=bm, BLOCK_N=bn_dx,
                BLOCK_K=bk, UPCAST=INTERPRET, num_warps=nw, num_stages=ns)
            d_x = dx_AD.view(M, K, D).sum(dim=1, dtype=torch.float32).to(dt)

        # Each expert's padded rows are blocks [expert_start[e], expert_start[e+1]).
        expert_start = torch.searchsorted(block_expert, torch.arange(E + 1, device=dev, dtype=torch.int32))
        expert_start = expert_start.to(torch.int32)
        br, bc = cfg.get("block_r", DW_CONFIG["block_r"]), cfg.get("block_c", DW_CONFIG["block_c"])
        d_gate_up = d_down = None
        if need_gu:
            d_gate_up = new_buffer(gate_up_proj.shape, dt, dev)
            _dw_bwd_kernel[(triton.cdiv(2 * I, br) * triton.cdiv(D, bc), E)](
                dgu_P2I, x_MD, d_gate_up, weight_A, sorted_ids, expert_start, dgu_P2I.stride(0), x_MD.stride(0),
                d_gate_up.stride(0), d_gate_up.stride(1), A, 2 * I, D, TOP_K=K, A_GATHER=False, A_SCALE=False,
                B_GATHER=True, BLOCK_M=bm, BLOCK_R=br, BLOCK_C=bc, UPCAST=INTERPRET, num_warps=nw, num_stages=ns)
        if need_down:
            d_down = new_buffer(down_proj.shape, dt, dev)
            _dw_bwd_kernel[(triton.cdiv(D, br) * triton.cdiv(I, bc), E)](
                dy_MD, h_PI, d_down, weight_A, sorted_ids, expert_start, dy_MD.stride(0), h_PI.stride(0),
                d_down.stride(0), d_down.stride(1), A, D, I, TOP_K=K, A_GATHER=True, A_SCALE=True,
                B_GATHER=False, BLOCK_M=bm, BLOCK_R=br, BLOCK_C=bc, UPCAST=INTERPRET, num_warps=nw, num_stages=ns)
        return d_x, d_gate_up, d_down, None, d_weight, None


# Eager between compiled blocks (Triton launches, host-side shapes). This module is imported on demand
# (not from kernels/__init__): the decorator loads torch._dynamo, ~2 s of import time.
@torch.compiler.disable
def fused_moe_train(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                    topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor,
                    config: dict | None = None) -> torch.Tensor:
    """Differentiable routed experts (same math as fused_moe): gradients for x, both weights and topk_weight.

    Weights are cast to x's dtype (fp32 master weights under bf16 autocast), the routing weight keeps
    its own (fp32). Triton where kernels.fused_moe runs it; the torch reference (autograd) elsewhere.
    """
    gate_up_proj, down_proj = gate_up_proj.to(x_MD.dtype), down_proj.to(x_MD.dtype)
    if x_MD.shape[0] == 0 or not use_triton(x_MD):
        return fused_moe_ref(x_MD, gate_up_proj, down_proj, topk_idx_MK, topk_weight_MK)
    return FusedMoEFunction.apply(x_MD, gate_up_proj, down_proj, topk_idx_MK, topk_weight_MK, config)
