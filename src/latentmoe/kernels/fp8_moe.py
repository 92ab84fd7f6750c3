"""Routed experts with block-FP8 weights: the fused-MoE grouped GEMMs (kernels/moe.py) reading e4m3 tiles.

Two pairs of kernels over the same row layouts (moe_align / few_token_layout) as `fused_moe`:
- weights only (few assignments per expert: decode): each weight tile is loaded as fp8 (half the bytes of
  bf16, and decode reads little else), converted to x's dtype in registers with its scale folded in.
  Activations stay in x's dtype.
- fp8 activations too (from FP8_ACTIVATIONS_MIN_PER_EXPERT assignments per expert: large decode batches,
  prefill): x is quantised per token and 128 columns (as DeepSeek-V3 trains), the dots run on FP8 tensor
  cores, and the SwiGLU output h is quantised the same way in the first kernel's epilogue (one scale per
  row and 128-column tile) for the second. Each 128-deep partial product carries the product of its two
  scales; rather than scaling every dot's result into a second accumulator, the accumulator is rescaled
  by the ratio of consecutive scales so the dot accumulates in place (`_rescale`), which measured faster
  at prefill tiles on an H200.

gate_up_proj [E, 2I, D] e4m3 with gate_up_scale [E, ceil(2I/128), ceil(D/128)], down_proj [E, D, I]
with down_scale [E, ceil(D/128), ceil(I/128)]: the stacked [gate | up] rows are quantised as one
matrix (the same scales as quantising gate and up apart when I is a multiple of 128, as in every
released model). Legend as in moe.py.
"""
import torch

from ._triton import INTERPRET, dot, dot_acc, jit, new_buffer, pdl_launch, tl, triton, use_triton, wait_for_inputs
from .fp8 import BLOCK, FP8_MAX, dequantize_fp8_blocks, quantize_fp8_groups, round_through_fp8_groups, to_fp8
from .moe import (DECODE_CONFIG, FEW_TOKENS, add_to_routed, choose_moe_config, down_descriptors, moe_align,
                  moe_combine, moe_shapes, program_expert, row_block, wait_for_add)
from .reference import fused_moe_ref


def fused_moe_fp8_ref(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK, topk_weight_MK):
    """The definition: the dequantised weights through the fp32 expert-by-expert reference."""
    return fused_moe_ref(x_MD, dequantize_fp8_blocks(gate_up_proj, gate_up_scale),
                         dequantize_fp8_blocks(down_proj, down_scale), topk_idx_MK, topk_weight_MK)


def fused_moe_fp8_w8a8_ref(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK, topk_weight_MK):
    """What the fp8-activation kernels compute: the fp32 reference over the dequantised weights, with x and the
    SwiGLU output h each rounded through fp8 groups of 128 columns per row."""
    y = fused_moe_ref(round_through_fp8_groups(x_MD.float()), dequantize_fp8_blocks(gate_up_proj, gate_up_scale),
                      dequantize_fp8_blocks(down_proj, down_scale), topk_idx_MK, topk_weight_MK,
                      round_h=lambda h: round_through_fp8_groups(h.float()))
    return y.to(x_MD.dtype)


# Over the few-token layout (batch-1/2 decode) both weight-only kernels launch with programmatic dependent launch,
# elsewhere without. Alone, back to back, they are faster without it (H100, V2-Lite shape, 26 layers a graph:
# 26.7 against 40.5 us a layer at one token), but in whole decode steps with it (one process, an FP8 engine per
# variant, H100: B=1 at 1K 2.18 against 2.42 ms a step, B=2 3.09 against 3.22), where it also beat one token's
# experts as row products on the CUDA cores (2.21 ms at B=1), a kernel pair that was removed for it
# (benchmarks/results/few_token_fp8.md). Prefill-sized grids gain nothing from an early launch.
#
# Measured and not taken: the per-element dequantisation is not what limits these kernels at decode sizes.
# Converting e4m3 to fp16 (one packed conversion per two elements, exact) with x in fp16 and the block scale on
# each tile's product, instead of fp32 multiply and bf16 rounding per weight: H100, V2-Lite shape, 6 layers a
# graph, 28.8 against 27.5 us a layer at 1 token, 134 against 128 at 8 tokens; FP8 engine decode at 1K within
# 2% either way (B=1 2.31 against 2.35 ms, B=4 4.29 against 4.24). It was more exact (0.0028 against 0.0040
# relative to the fp32 reference) but needed a second K loop for activations beyond fp16's range.
# Nor is the weight tiles' staging: compiled for sm90 they reach shared memory through the pipeliner's
# asynchronous copies. Few-token kernels with fp8 activations (tiles straight into FP8 dots) were ten times less
# exact and, timed alone, not clearly faster (results/few_token_fp8.md); not tried in whole decode steps.
@jit
def _moe_fp8_gate_up_kernel(x_ptr, w_ptr, s_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr,
                            stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_hm, A, D, I, E,
                            TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr, UPCAST: tl.constexpr,
                            PDL: tl.constexpr):
    """h[p, n] = silu(x[tok(p)] . w_gate[e, n]) * (x[tok(p)] . w_up[e, n]), weights dequantised per tile."""
    # Which expert a block reads is the router's output: nothing to load before the wait.
    wait_for_inputs(PDL)
    pid_m, pid_n, e = program_expert(block_expert_ptr)
    if e < E:
        offs_m, ids, valid, tok, offs_n, mask_n = row_block(sorted_ids_ptr, pid_m, pid_n, A, I, TOP_K, BLOCK_M, BLOCK_N)
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
                         SCALE_BLOCK: tl.constexpr, UPCAST: tl.constexpr, PDL: tl.constexpr):
    """y[id(p), n] = weight[id(p)] * (h[p] . w_down[e, n]), weights dequantised per tile."""
    wait_for_inputs(PDL)
    pid_m, pid_n, e = program_expert(block_expert_ptr)
    if e < E:
        offs_m, ids, valid, _, offs_n, mask_n = row_block(sorted_ids_ptr, pid_m, pid_n, A, D, 1, BLOCK_M, BLOCK_N)
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
                         add_MD: torch.Tensor | None = None, residual_MD: torch.Tensor | None = None,
                         add_ready=None) -> torch.Tensor:
    M, D, K, E, I = moe_shapes(x_MD, gate_up_proj, down_proj, topk_idx_MK)
    A = M * K
    assert gate_up_proj.stride(-1) == 1 and down_proj.stride(-1) == 1
    x_MD = x_MD if x_MD.stride(-1) == 1 else x_MD.contiguous()
    if few_token_layout is not None and M <= FEW_TOKENS:
        cfg = config or DECODE_CONFIG
        assert cfg["block_m"] == DECODE_CONFIG["block_m"], "the few-token layout has DECODE_CONFIG's row blocks"
        assert few_token_layout.numel() >= A * cfg["block_m"], "the layout was built for fewer assignments"
        sorted_ids, block_expert = few_token_layout, topk_idx_MK.reshape(-1)   # block a = assignment a
        launch = pdl_launch(x_MD)   # why: the note above the weight-only kernels
    else:
        cfg = config or choose_moe_config(A, E)
        sorted_ids, block_expert = moe_align(topk_idx_MK, E, cfg["block_m"])
        launch = {"PDL": False}
    bm, bk, nw, ns = cfg["block_m"], cfg["block_k"], cfg["num_warps"], cfg["num_stages"]
    assert BLOCK % bk == 0, "a K tile must lie inside one scale block"
    n_blocks = block_expert.numel()
    h_PI = new_buffer((n_blocks * bm, I), x_MD.dtype, x_MD.device)
    _moe_fp8_gate_up_kernel[(triton.cdiv(I, cfg["block_n1"]), n_blocks)](
        x_MD, gate_up_proj, gate_up_scale, h_PI, sorted_ids, block_expert,
        x_MD.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_scale.stride(0),
        gate_up_scale.stride(1), h_PI.stride(0), A, D, I, E,
        TOP_K=K, BLOCK_M=bm, BLOCK_N=cfg["block_n1"], BLOCK_K=bk, SCALE_BLOCK=BLOCK, UPCAST=INTERPRET,
        num_warps=nw, num_stages=ns, **launch)
    y_AD = new_buffer((A, D), x_MD.dtype, x_MD.device)
    weight_A = topk_weight_MK.reshape(-1).contiguous()
    _moe_fp8_down_kernel[(triton.cdiv(D, cfg["block_n2"]), n_blocks)](
        h_PI, down_proj, down_scale, y_AD, sorted_ids, block_expert, weight_A,
        h_PI.stride(0), down_proj.stride(0), down_proj.stride(1), down_scale.stride(0), down_scale.stride(1),
        y_AD.stride(0), A, I, D, E,
        BLOCK_M=bm, BLOCK_N=cfg["block_n2"], BLOCK_K=bk, SCALE_BLOCK=BLOCK, UPCAST=INTERPRET,
        num_warps=nw, num_stages=ns, **launch)
    return moe_combine(y_AD, K, add_MD, residual_MD, add_ready)


@jit
def _rescale(acc, prev, s):
    """acc holds sum_k s_k d_k / s_{k-1} (per-row scales s, the weight tile's folded in): bring it to the new
    scale, so the next dot accumulates in place. Finally acc * prev is the scaled sum.

    Compiled for sm90, each K step's tensor-core product must finish before the accumulator is rescaled
    (wgmma waits with nothing pending). Keeping two products in flight measured slower, not faster (H100,
    8K tokens: down over two accumulator chains 495 us against 347, at 816 TFLOP/s with this one; see the
    configs below), so the in-place chain stays."""
    return acc * (prev / s)[:, None]


@jit(do_not_specialize=("A",))
def _moe_w8a8_gate_up_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, h_ptr, hs_ptr, sorted_ids_ptr, block_expert_ptr,
                             stride_xm, stride_xsm, stride_we, stride_wn, stride_se, stride_sn, stride_hm, stride_hsm,
                             A, D, I, E, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                             FP8_MAX_C: tl.constexpr, UPCAST: tl.constexpr, INTERPRETED: tl.constexpr):
    """h[p, n] = silu(x[tok(p)] . w_gate[e, n]) * (x[tok(p)] . w_up[e, n]) on fp8 operands, stored as fp8 with
    one scale per row of the tile. Tiles are BLOCK (the scale block) wide and deep; D and I are multiples of it,
    so nothing but padding rows is masked and each weight tile has one scale."""
    pid_m, pid_n, e = program_expert(block_expert_ptr)
    if e < E:
        # (I is whole BLOCK columns: the mask row_block returns is not needed)
        offs_m, ids, valid, tok, offs_n, _ = row_block(sorted_ids_ptr, pid_m, pid_n, A, I, TOP_K, BLOCK_M, BLOCK)
        offs_k = tl.arange(0, BLOCK)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
        xs_ptrs = xs_ptr + tok * stride_xsm
        wg_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK, BLOCK]
        wu_ptrs = wg_ptrs + I * stride_wn
        sg_ptr = s_ptr + e * stride_se + pid_n * stride_sn
        su_ptr = sg_ptr + (I // BLOCK) * stride_sn
        acc_g = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
        prev_g = tl.full([BLOCK_M], 1.0, tl.float32)
        prev_u = tl.full([BLOCK_M], 1.0, tl.float32)
        for kb in range(0, D // BLOCK):
            xa = tl.load(x_ptrs, mask=valid[:, None], other=0.0)
            sx = tl.load(xs_ptrs + kb, mask=valid, other=1.0)
            s_g = sx * tl.load(sg_ptr + kb)
            s_u = sx * tl.load(su_ptr + kb)
            acc_g = dot_acc(xa, tl.load(wg_ptrs), _rescale(acc_g, prev_g, s_g), UPCAST)
            acc_u = dot_acc(xa, tl.load(wu_ptrs), _rescale(acc_u, prev_u, s_u), UPCAST)
            prev_g = s_g
            prev_u = s_u
            x_ptrs += BLOCK
            wg_ptrs += BLOCK
            wu_ptrs += BLOCK
        acc_g = acc_g * prev_g[:, None]
        acc_u = acc_u * prev_u[:, None]
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        scale = tl.maximum(tl.max(tl.abs(h), 1) / FP8_MAX_C, 1e-12)
        hq = tl.minimum(tl.maximum(h / scale[:, None], -FP8_MAX_C), FP8_MAX_C)
        tl.store(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :],
                 to_fp8(hq, h_ptr.dtype.element_ty, INTERPRETED))
        tl.store(hs_ptr + offs_m.to(tl.int64) * stride_hsm + pid_n, scale)


@jit(do_not_specialize=("A",))
def _moe_w8a8_down_kernel(h_ptr, h_desc, hs_ptr, w_ptr, w_desc, s_ptr, y_ptr, sorted_ids_ptr, block_expert_ptr,
                          topk_weight_ptr, stride_hm, stride_hsm, stride_we, stride_wn, stride_se, stride_sn, stride_ym,
                          A, I, D, E, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, UPCAST: tl.constexpr,
                          TMA: tl.constexpr):
    """y[id(p), n] = weight[id(p)] * (h[p] . w_down[e, n]) on fp8 operands (tiles as in the first kernel).
    TMA reads both operands as descriptor boxes: h_desc over h [P, I], w_desc over the weights [E, D, I]."""
    pid_m, pid_n, e = program_expert(block_expert_ptr)
    if e < E:
        offs_m, ids, valid, _, offs_n, _ = row_block(sorted_ids_ptr, pid_m, pid_n, A, D, 1, BLOCK_M, BLOCK)
        offs_k = tl.arange(0, BLOCK)
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
        hs_ptrs = hs_ptr + offs_m.to(tl.int64) * stride_hsm
        w_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]   # [BLOCK, BLOCK]
        sw_ptr = s_ptr + e * stride_se + pid_n * stride_sn
        acc = tl.zeros([BLOCK_M, BLOCK], dtype=tl.float32)
        prev = tl.full([BLOCK_M], 1.0, tl.float32)
        for kb in range(0, I // BLOCK):
            s = tl.load(hs_ptrs + kb) * tl.load(sw_ptr + kb)
            if TMA:
                ha = h_desc.load([pid_m * BLOCK_M, kb * BLOCK])
                w = tl.reshape(w_desc.load([e.to(tl.int32), pid_n * BLOCK, kb * BLOCK]), [BLOCK, BLOCK]).T
            else:
                ha = tl.load(h_ptrs)
                w = tl.load(w_ptrs)
            acc = dot_acc(ha, w, _rescale(acc, prev, s), UPCAST)
            prev = s
            h_ptrs += BLOCK
            w_ptrs += BLOCK
        acc = acc * prev[:, None]
        wt = tl.load(topk_weight_ptr + ids, mask=valid, other=0.0).to(tl.float32)
        tl.store(y_ptr + ids[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                 (acc * wt[:, None]).to(y_ptr.dtype.element_ty), mask=valid[:, None])


# Row tiles for the fp8-activation kernels by assignments per expert (H200 sweep, benchmarks/results/fp8.md);
# column and K tiles are one scale block. `gate_up_stages`: the first GEMM's pipeline depth (default
# num_stages). H100, V2-Lite shape, 8K tokens, graph replays: gate_up 733 against 776 us with 3 stages,
# identical output (down runs at 816 TFLOP/s with 3; 4 do not fit its shared memory beside the TMA boxes).
# An 8K prefill through the engine (one process, alternating) did not resolve the ~1% this is worth: single
# prefills spread from 77 to 125 ms (medians 89.3 with 4 stages, 85.0 with 3).
# Tried there and slower: gate_up scaling each fresh product instead of rescaling the accumulator in place
# (1,025 us), down over two accumulator chains (even / odd K blocks: 495 against 347 us) or scale-add (460);
# Triton's warp specialisation of the K loop changed nothing. `benchmarks/bench_kernels.py --fp8-moe --sweep`
# times the configs against each other and the bf16 fused MoE.
# Decode batches (W8A8_CONFIG, 16-63 assignments per expert): deeper pipelines. H100, V2-Lite shape, random
# routing, graph replays, the whole FP8 MoE: 256 tokens 223.7 against 233.5 us with 3 stages (best of 24 row
# tiles x warps x stages), 512 tokens 230.9 against 239.6.
W8A8_CONFIG = dict(block_m=64, num_warps=4, num_stages=4, gate_up_stages=5)
W8A8_PREFILL_CONFIG = dict(block_m=128, num_warps=8, num_stages=3, gate_up_stages=4)


def choose_w8a8_config(n_assignments: int, n_experts: int) -> dict:
    return W8A8_PREFILL_CONFIG if n_assignments >= 64 * n_experts else W8A8_CONFIG


def fused_moe_fp8_w8a8_triton(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK,
                              topk_weight_MK, config: dict | None = None,
                              add_MD: torch.Tensor | None = None,
                              residual_MD: torch.Tensor | None = None, add_ready=None) -> torch.Tensor:
    """The fp8-activation kernels: x quantised per token and 128 columns, both GEMMs on FP8 tensor cores.
    D and I must be multiples of 128 (every released model's are)."""
    M, D, K, E, I = moe_shapes(x_MD, gate_up_proj, down_proj, topk_idx_MK)
    A = M * K
    assert gate_up_proj.stride(-1) == 1 and down_proj.stride(-1) == 1
    assert D % BLOCK == 0 and I % BLOCK == 0, "the fp8-activation kernels need whole 128-wide scale blocks"
    cfg = config or choose_w8a8_config(A, E)
    bm, nw, ns = cfg["block_m"], cfg["num_warps"], cfg["num_stages"]
    xq, xs = quantize_fp8_groups(x_MD)
    sorted_ids, block_expert = moe_align(topk_idx_MK, E, bm)
    n_blocks = block_expert.numel()
    h_PI = new_buffer((n_blocks * bm, I), xq.dtype, x_MD.device)
    hs_PG = new_buffer((n_blocks * bm, I // BLOCK), torch.float32, x_MD.device)
    _moe_w8a8_gate_up_kernel[(I // BLOCK, n_blocks)](
        xq, xs, gate_up_proj, gate_up_scale, h_PI, hs_PG, sorted_ids, block_expert,
        xq.stride(0), xs.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_scale.stride(0),
        gate_up_scale.stride(1), h_PI.stride(0), hs_PG.stride(0), A, D, I, E,
        TOP_K=K, BLOCK_M=bm, BLOCK=BLOCK, FP8_MAX_C=FP8_MAX, UPCAST=INTERPRET, INTERPRETED=INTERPRET,
        num_warps=nw, num_stages=cfg.get("gate_up_stages", ns))
    y_AD = new_buffer((A, D), x_MD.dtype, x_MD.device)
    weight_A = topk_weight_MK.reshape(-1).contiguous()
    # The down GEMM's tiles through the tensor memory accelerator where the GPU has it (kernels._triton.
    # tensor_descriptor): H100, V2-Lite shape, 8K tokens, graph replays, the whole FP8 MoE 1,231 against 1,275 us.
    # (The first GEMM's weight tiles as TMA boxes, gate and up as one [2 x 128]-column dot, measured no faster.)
    # (`tma` False in the config: pointer loads, as on GPUs without the accelerator.)
    descs = down_descriptors(h_PI, down_proj, bm, BLOCK, BLOCK) if cfg.get("tma", True) else None
    h_desc, w_desc = descs or (None, None)
    _moe_w8a8_down_kernel[(D // BLOCK, n_blocks)](
        h_PI, h_desc, hs_PG, down_proj, w_desc, down_scale, y_AD, sorted_ids,
        block_expert, weight_A, h_PI.stride(0), hs_PG.stride(0), down_proj.stride(0), down_proj.stride(1),
        down_scale.stride(0), down_scale.stride(1), y_AD.stride(0), A, I, D, E,
        BLOCK_M=bm, BLOCK=BLOCK, UPCAST=INTERPRET, TMA=descs is not None, num_warps=nw, num_stages=ns)
    return moe_combine(y_AD, K, add_MD, residual_MD, add_ready)


# From this many assignments per expert the fp8-activation kernels run (each weight tile then serves enough
# rows for tensor cores to pay); below it, and for the few-token layout, the weight-only kernels.
FP8_ACTIVATIONS_MIN_PER_EXPERT = 16


def uses_fp8_activations(n_assignments: int, down_proj_shape: tuple[int, ...], few_tokens: bool = False) -> bool:
    """Whether `fused_moe_fp8` quantises the activations: for this many (token, expert) assignments over experts
    of this down_proj shape [E, D, I] (D and I whole scale blocks), outside the few-token layout."""
    E, D, I = down_proj_shape
    return (not few_tokens and n_assignments >= FP8_ACTIVATIONS_MIN_PER_EXPERT * E
            and D % BLOCK == 0 and I % BLOCK == 0)


def fused_moe_fp8(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor,
                  down_proj: torch.Tensor, down_scale: torch.Tensor, topk_idx_MK: torch.Tensor,
                  topk_weight_MK: torch.Tensor, few_token_layout: torch.Tensor | None = None,
                  add_MD: torch.Tensor | None = None, residual_MD: torch.Tensor | None = None,
                  add_ready=None) -> torch.Tensor:
    """`fused_moe` over block-FP8 expert weights -> [M, D] in x's dtype. From FP8_ACTIVATIONS_MIN_PER_EXPERT
    assignments per expert the activations are quantised too (FP8 tensor cores); fewer run the weight-only
    kernels. Triton on CUDA (CPU under TRITON_INTERPRET=1); elsewhere the matching reference, so a CPU run
    rounds the activations where a GPU would. `add_MD`, `residual_MD` and `add_ready` as in `fused_moe`."""
    M = x_MD.shape[0]
    if M == 0:
        return x_MD.clone()
    few = few_token_layout is not None and M <= FEW_TOKENS
    w8a8 = uses_fp8_activations(topk_idx_MK.numel(), down_proj.shape, few)
    if not use_triton(x_MD):
        ref = fused_moe_fp8_w8a8_ref if w8a8 else fused_moe_fp8_ref
        y = ref(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK, topk_weight_MK)
        wait_for_add(add_ready, x_MD.device)
        return add_to_routed(y, add_MD, residual_MD)
    if w8a8:
        return fused_moe_fp8_w8a8_triton(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK,
                                         topk_weight_MK, add_MD=add_MD, residual_MD=residual_MD, add_ready=add_ready)
    return fused_moe_fp8_triton(x_MD, gate_up_proj, gate_up_scale, down_proj, down_scale, topk_idx_MK,
                                topk_weight_MK, few_token_layout, add_MD=add_MD, residual_MD=residual_MD,
                                add_ready=add_ready)


__all__ = ["fused_moe_fp8", "fused_moe_fp8_ref", "fused_moe_fp8_triton", "fused_moe_fp8_w8a8_ref",
           "fused_moe_fp8_w8a8_triton", "uses_fp8_activations", "FP8_ACTIVATIONS_MIN_PER_EXPERT"]
