"""Routed experts as two Triton grouped GEMMs over expert-sorted (token, expert) assignments.

Assignments are grouped by expert and each expert's group padded to BLOCK_M rows, so every
program works for one expert: it gathers its tokens' rows of x straight from x_MD (no permuted
copy), and reads each weight tile once per BLOCK_M assignments. Few tokens (decode) use
BLOCK_M = 16, so each touched expert's weights are read once; many tokens (prefill) use large
tiles, whose weight tiles (and the second GEMM's activation tiles) the tensor memory accelerator
copies where the GPU has one (`tma` in PREFILL_CONFIG). SwiGLU runs in the first GEMM's epilogue, the
routing weight in the second's. One or two tokens (batch-1/2 decode) skip the sort: see `few_token_layout`.

Legend: M tokens, K experts per token, A = M*K assignments, E experts, D hidden, I expert width,
P padded assignment rows (a multiple of BLOCK_M).
"""
import torch

from ._triton import (INTERPRET, cast, dot, jit, new_buffer, pdl_launch, tensor_descriptor, tl, triton, use_triton,
                      wait_for_inputs)
from .reference import fused_moe_ref


def moe_align_torch(topk_idx_MK: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_align in torch ops (a stable argsort and a dozen small ops): any size, any device."""
    A = topk_idx_MK.numel()
    dev = topk_idx_MK.device
    flat_A = topk_idx_MK.flatten()
    order_A = flat_A.argsort(stable=True)
    # scatter_add, not bincount: bincount reads the max back to the host (a sync, no CUDA graphs).
    counts_E = torch.zeros(n_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat_A, torch.ones_like(flat_A))
    blocks_E = (counts_E + block_m - 1) // block_m
    block_end_E = blocks_E.cumsum(0)
    first_row_E = (block_end_E - blocks_E) * block_m       # first padded row of each expert
    first_rank_E = counts_E.cumsum(0) - counts_E           # first sorted position of each expert
    expert_A = flat_A[order_A]
    dest_A = first_row_E[expert_A] + torch.arange(A, device=dev) - first_rank_E[expert_A]
    n_blocks = align_blocks(A, n_experts, block_m)
    sorted_ids = torch.full((n_blocks * block_m,), A, dtype=torch.int32, device=dev)
    sorted_ids[dest_A] = order_A.to(torch.int32)
    block_expert = torch.searchsorted(block_end_E, torch.arange(n_blocks, device=dev), right=True).to(torch.int32)
    return sorted_ids, block_expert


def align_blocks(n_assignments: int, n_experts: int, block_m: int) -> int:
    """Worst-case row blocks: every expert's group may end in a partial block."""
    return triton.cdiv(n_assignments, block_m) + min(n_experts, n_assignments)


@jit(do_not_specialize=("A", "n_chunks"))
def _moe_align_count_kernel(idx_ptr, chunk_base_ptr, A, E, n_chunks, BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr):
    """One program per chunk of BLOCK_A assignments: its count per expert, into chunk_base[c, :] (the prefix
    kernel turns the counts into running counts in place)."""
    c = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    a = c * BLOCK_A + tl.arange(0, BLOCK_A)
    e = tl.load(idx_ptr + a, mask=a < A, other=E).to(tl.int32)
    tl.store(chunk_base_ptr + c * BLOCK_E + offs_e, tl.sum((e[:, None] == offs_e[None, :]).to(tl.int32), 0))


@jit(do_not_specialize=("A", "n_chunks"))
def _moe_align_prefix_kernel(idx_ptr, chunk_base_ptr, A, n_chunks, E, BLOCK_E: tl.constexpr, BLOCK_A: tl.constexpr,
                             BLOCK_C: tl.constexpr, COUNTED: tl.constexpr):
    """One program, the only serial part: chunk_base[c, e] = assignments to e before chunk c, and in row
    n_chunks each expert's total (everything else the scatter kernel's programs derive from these).

    COUNTED: chunk_base already holds each chunk's counts (_moe_align_count_kernel, one program per chunk),
    whose running sums are taken BLOCK_C chunks at a time; otherwise this program counts the assignments
    itself, BLOCK_A at a time (one launch fewer, slower for many assignments)."""
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    if COUNTED:
        offs_c = tl.arange(0, BLOCK_C)
        for c0 in range(0, n_chunks, BLOCK_C):
            ptrs = chunk_base_ptr + (c0 + offs_c)[:, None] * BLOCK_E + offs_e[None, :]
            mask = (c0 + offs_c)[:, None] < n_chunks
            cnt = tl.load(ptrs, mask=mask, other=0)
            tl.store(ptrs, tl.cumsum(cnt, 0) - cnt + counts[None, :], mask=mask)
            counts += tl.sum(cnt, 0)
    else:
        offs_a = tl.arange(0, BLOCK_A)
        for a0 in range(0, A, BLOCK_A):
            tl.store(chunk_base_ptr + (a0 // BLOCK_A) * BLOCK_E + offs_e, counts)
            e = tl.load(idx_ptr + a0 + offs_a, mask=a0 + offs_a < A, other=E).to(tl.int32)
            counts += tl.sum((e[:, None] == offs_e[None, :]).to(tl.int32), 0)
    tl.store(chunk_base_ptr + n_chunks * BLOCK_E + offs_e, counts)


@jit(do_not_specialize=("A", "n_blocks", "n_chunks", "blocks_per_program"))
def _moe_align_scatter_kernel(idx_ptr, sorted_ids_ptr, block_expert_ptr, chunk_base_ptr, A, E, n_blocks, n_chunks,
                              blocks_per_program, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                              BLOCK_A: tl.constexpr, BLOCK_J: tl.constexpr):
    """One program per chunk of assignments. From the experts' totals, the padded group layout (each
    expert's first row); then each assignment's row = its expert's first row + the assignments to that
    expert before its chunk + its rank among the chunk's own (a one-hot prefix sum). Besides, the program
    writes block_expert and the padding rows of its share of the row blocks (blocks_per_program of them):
    spread over the programs, not left to the serial kernel (one program took 14 us for them at 1,536
    assignments in 16-row blocks on an H200, 52 us at 98K in 128-row blocks)."""
    c = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.load(chunk_base_ptr + n_chunks * BLOCK_E + offs_e)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, 0)
    first_row = (block_end - blocks) * BLOCK_M
    a = c * BLOCK_A + tl.arange(0, BLOCK_A)
    e = tl.load(idx_ptr + a, mask=a < A, other=E).to(tl.int32)
    hot = (e[:, None] == offs_e[None, :]).to(tl.int32)                               # [BLOCK_A, BLOCK_E]
    base = tl.load(chunk_base_ptr + c * BLOCK_E + offs_e) + first_row
    dest = tl.sum((tl.cumsum(hot, 0) - 1 + base[None, :]) * hot, 1)
    tl.store(sorted_ids_ptr + dest, a, mask=(a < A) & (e < E))
    block_end = tl.where(offs_e < E, block_end, 1 << 30)
    offs_j = tl.arange(0, BLOCK_J)
    offs_r = tl.arange(0, BLOCK_M)
    j_end = tl.minimum((c + 1) * blocks_per_program, n_blocks)
    for j0 in range(c * blocks_per_program, j_end, BLOCK_J):
        j = j0 + offs_j
        # A block's expert = how many experts end at or before it (E past the last used block).
        be = tl.sum((block_end[None, :] <= j[:, None]).to(tl.int32), 1)
        tl.store(block_expert_ptr + j, be, mask=j < j_end)
        # Padding: a block's rows past its expert's count, and every row of blocks past the last.
        hot_j = offs_e[None, :] == be[:, None]
        fr = tl.sum(tl.where(hot_j, first_row[None, :], 0), 1)
        cnt = tl.sum(tl.where(hot_j, counts[None, :], 0), 1)
        row = j[:, None] * BLOCK_M + offs_r[None, :]                                # [BLOCK_J, BLOCK_M]
        pad = (be[:, None] >= E) | (row - fr[:, None] >= cnt[:, None])
        tl.store(sorted_ids_ptr + row, tl.zeros([BLOCK_J, BLOCK_M], dtype=tl.int32) + A,
                 mask=(j[:, None] < j_end) & pad)


# Up to this many assignments one program counts them (decode batches: one launch fewer); above, one
# program per chunk counts first. On an H200 (graph replays, before the block layout moved to the scatter
# kernel): serial 10.5 / 13.9 / 17.8 / 41.7 us at 6 / 384 / 1,536 / 8,190 assignments, parallel 12.2 / 14.0 /
# 13.8 / 16.1 us, and 38-123 us from 49K to 197K where the torch path (a radix sort and a dozen small ops,
# used where Triton does not run) took 127-172 us.
ALIGN_SERIAL_COUNT_MAX_ASSIGNMENTS = 1024


def moe_align(topk_idx_MK: torch.Tensor, n_experts: int, block_m: int,
              parallel_count: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> sorted_ids [P] (assignment ids m*K+k grouped by expert in assignment order, each group
    padded to block_m with the id A), block_expert [P / block_m] (each row block's expert; E for
    blocks past the last).

    P is the worst case align_blocks(A, E, block_m) * block_m, so shapes never depend on the routing
    (no host sync; CUDA graphs can capture it). Triton kernels where Triton runs (`parallel_count`: count
    per chunk in parallel first; by default above ALIGN_SERIAL_COUNT_MAX_ASSIGNMENTS), torch ops otherwise
    (the same output).
    """
    A = topk_idx_MK.numel()
    if not use_triton(topk_idx_MK) or A == 0:
        return moe_align_torch(topk_idx_MK, n_experts, block_m)
    n_blocks = align_blocks(A, n_experts, block_m)
    sorted_ids = new_buffer((n_blocks * block_m,), torch.int32, topk_idx_MK.device)
    block_expert = new_buffer((n_blocks,), torch.int32, topk_idx_MK.device)
    block_e = triton.next_power_of_2(n_experts)
    block_a = max(16, min(128, 8192 // block_e))
    n_chunks = triton.cdiv(A, block_a)
    idx_A = topk_idx_MK.reshape(-1).contiguous()
    chunk_base = new_buffer((n_chunks + 1, block_e), torch.int32, topk_idx_MK.device)   # + the totals' row
    counted = A > ALIGN_SERIAL_COUNT_MAX_ASSIGNMENTS if parallel_count is None else parallel_count
    if counted:
        _moe_align_count_kernel[(n_chunks,)](idx_A, chunk_base, A, n_experts, n_chunks,
                                             BLOCK_E=block_e, BLOCK_A=block_a, num_warps=4)
    _moe_align_prefix_kernel[(1,)](idx_A, chunk_base, A, n_chunks, n_experts, BLOCK_E=block_e, BLOCK_A=block_a,
                                   BLOCK_C=max(1, 4096 // block_e), COUNTED=counted, num_warps=4)
    per_program = triton.cdiv(n_blocks, n_chunks)   # a host int; BLOCK_J depends on block_m alone (no new variants)
    _moe_align_scatter_kernel[(n_chunks,)](idx_A, sorted_ids, block_expert, chunk_base, A, n_experts, n_blocks,
                                           n_chunks, per_program, BLOCK_M=block_m, BLOCK_E=block_e,
                                           BLOCK_A=block_a, BLOCK_J=min(16, max(1, 1024 // block_m)), num_warps=4)
    return sorted_ids, block_expert


@jit
def program_expert(block_expert_ptr):
    """(pid_m, pid_n, expert) of a grouped-GEMM program: row block pid_m (grid axis 1) belongs to one expert
    (block_expert[pid_m]; >= E for blocks past the used ones, which the kernels skip); pid_n is its column tile."""
    pid_m = tl.program_id(1)
    return pid_m, tl.program_id(0), tl.load(block_expert_ptr + pid_m).to(tl.int64)


@jit
def row_block(sorted_ids_ptr, pid_m, pid_n, A, N, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where program (pid_m, pid_n) of a grouped GEMM over expert-sorted rows works (shared by the forward,
    backward and FP8 kernels): its padded rows offs_m, their assignment ids (>= A for padding rows), which
    rows are valid, the tokens they gather (id // TOP_K), and its output columns offs_n with their mask < N."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)
    valid = ids < A
    tok = (ids // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, ids, valid, tok, offs_n, offs_n < N


@jit
def _moe_gate_up_kernel(x_ptr, w_ptr, w_desc, h_ptr, gu_ptr, sorted_ids_ptr, block_expert_ptr,
                        stride_xm, stride_we, stride_wn, stride_hm, stride_gm, A, D, I, E,
                        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, STORE_GU: tl.constexpr, MERGED: tl.constexpr,
                        TMA: tl.constexpr, PDL: tl.constexpr):
    """h[p, n] = silu(x[tok(p)] . w_gate[e, n]) * (x[tok(p)] . w_up[e, n]) for the rows p of one block.

    MERGED loads the gate and up columns of a tile as one [BLOCK_K, 2 BLOCK_N] operand and runs one dot into
    one accumulator, split in the epilogue: at prefill tiles on an H200 (128 rows, 2 x 128 columns) 9-12%
    faster than two dots of 128 columns (fewer, wider tensor-core instructions per loaded x tile).
    TMA (with MERGED) reads that operand as one box of w_desc, the weights viewed [E, 2, I, D]: the tensor
    memory accelerator copies the gate and up rows into shared memory (no address math or masks in the
    loop, out-of-range rows and columns read as zeros); x's rows stay gathered by pointer.
    STORE_GU (training) also keeps the SwiGLU inputs gu[p] = [gate | up] for the backward; inference
    passes any pointer there and the stores compile away."""
    wait_for_inputs(PDL)
    pid_m, pid_n, e = program_expert(block_expert_ptr)
    if e < E:
        offs_m, ids, valid, tok, offs_n, mask_n = row_block(sorted_ids_ptr, pid_m, pid_n, A, I, TOP_K, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]
        if MERGED:
            # Columns j < BLOCK_N are gate column offs_n[j], the rest up column offs_n[j - BLOCK_N] (row I + n).
            j = tl.arange(0, 2 * BLOCK_N)
            n2 = pid_n * BLOCK_N + j % BLOCK_N
            mask_n2 = n2 < I
            w_ptrs = w_ptr + e * stride_we + tl.where(j < BLOCK_N, n2, I + n2)[None, :] * stride_wn + offs_k[:, None]
            acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                mask_k = offs_k < D - k0
                xa = tl.load(x_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
                if TMA:
                    box = w_desc.load([e.to(tl.int32), 0, pid_n * BLOCK_N, k0])       # [1, 2, BLOCK_N, BLOCK_K]
                    w = tl.reshape(box, [2 * BLOCK_N, BLOCK_K]).T
                else:
                    w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n2[None, :], other=0.0)
                acc += dot(xa, w, UPCAST)
                x_ptrs += BLOCK_K
                w_ptrs += BLOCK_K
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, BLOCK_N]), [0, 2, 1]))
        else:
            wg_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
            wu_ptrs = wg_ptrs + I * stride_wn
            acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                mask_k = offs_k < D - k0
                xa = tl.load(x_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0)
                wg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                wu = tl.load(wu_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc_g += dot(xa, wg, UPCAST)
                acc_u += dot(xa, wu, UPCAST)
                x_ptrs += BLOCK_K
                wg_ptrs += BLOCK_K
                wu_ptrs += BLOCK_K
        rows = offs_m[:, None].to(tl.int64)
        if STORE_GU:
            gu_ptrs = gu_ptr + rows * stride_gm + offs_n[None, :]
            tl.store(gu_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=mask_n[None, :])
            tl.store(gu_ptrs + I, acc_u.to(gu_ptr.dtype.element_ty), mask=mask_n[None, :])
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(h_ptr + rows * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mask_n[None, :])


@jit
def _moe_down_kernel(h_ptr, h_desc, w_ptr, w_desc, y_ptr, sorted_ids_ptr, block_expert_ptr, topk_weight_ptr,
                     stride_hm, stride_we, stride_wn, stride_ym, A, I, D, E,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                     TMA: tl.constexpr, PDL: tl.constexpr):
    """y[id(p), n] = weight[id(p)] * (h[p] . w_down[e, n]), written at the assignment's own row.
    TMA reads both operands as descriptor boxes: h_desc over h [P, I], w_desc over the weights [E, D, I]."""
    wait_for_inputs(PDL)
    pid_m, pid_n, e = program_expert(block_expert_ptr)
    if e < E:
        offs_m, ids, valid, _, offs_n, mask_n = row_block(sorted_ids_ptr, pid_m, pid_n, A, D, 1, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
        w_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]   # [BLOCK_K, BLOCK_N]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            if TMA:
                ha = h_desc.load([pid_m * BLOCK_M, k0])
                w = tl.reshape(w_desc.load([e.to(tl.int32), pid_n * BLOCK_N, k0]), [BLOCK_N, BLOCK_K]).T
            else:
                mask_k = offs_k < I - k0
                ha = tl.load(h_ptrs, mask=mask_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc += dot(ha, w, UPCAST)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        wt = tl.load(topk_weight_ptr + ids, mask=valid, other=0.0).to(tl.float32)
        y = acc * wt[:, None]
        tl.store(y_ptr + ids[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


# Tile shapes by tokens per expert (block_n1: gate_up GEMM, two accumulators; block_n2: down GEMM).
# Picked by the sweep of benchmarks/bench_kernels.py on an H100 (results/kernels.md).
DECODE_CONFIG = dict(block_m=16, block_n1=32, block_n2=32, block_k=128, num_warps=4, num_stages=4)
# The unsorted few-token layout (below): one row block per assignment, so wider column tiles pay. Swept
# on an H200 at V2-Lite's shape (64 tile configs, graph replays): at 1 token gate_up 19.7 us against
# 24.3 with DECODE_CONFIG and down 9.1 against 10.9; at 2 tokens 35.9 / 19.6 against 38.2 / 20.8.
FEW_TOKEN_CONFIG = dict(DECODE_CONFIG, block_n1=64, block_n2=64)
# Large decode batches (16-31 rows per expert: V2-Lite from ~171 tokens): with 16-row blocks most experts
# take two row blocks, and each block reads the expert's whole weight tile again. 32-row blocks read it once.
# H100, V2-Lite shape, random top-6, graph replays (us for both GEMMs and the combine, DECODE_CONFIG against
# this): 200 tokens 412.9 / 395.5, 256 tokens 430.2 / 398.9; at 64 and 128 tokens DECODE_CONFIG stays
# (386.4 / 390.5, 391.8 / 395.2). In the engine (H100, two engines in one process, greedy identical): decode
# B=200 at 1K context 16.07 against 15.60 ms a step; 200 x (1,000 in, 100 out) 56.9 against 57.0-57.3 req/s.
DECODE_WIDE_CONFIG = dict(DECODE_CONFIG, block_m=32, block_n1=64, block_n2=64)
# Prefill: gate_up as one dot over 2 x 128 columns (`merged`), down over 256 columns. On an H200 at V2-Lite's
# shape (graph replays, 8K and 16K tokens) gate_up 2,112 against 2,320 us at 16K (two 128-column dots) and
# down 1,146 against 1,244 (128 columns); 1.12x and 1.10x at 8K.
# `tma`: both GEMMs read their weight tiles (and down its h tiles) as TMA boxes where the GPU has them
# (kernels._triton.tensor_descriptor), gate_up with 4 stages: H200, V2-Lite shape, graph replays, at 8K / 16K
# tokens gate_up 967 / 1,988 us against 1,097 / 2,128 with pointer loads and 3 stages, down 465 / 1,025 against
# 532 / 1,137 (a 4th stage did not help down).
# Measured and not taken: Triton's warp specialisation of down's loop (`tl.range(..., warp_specialize=True)`,
# Triton 3.6; gate_up gathers x by pointer, which it does not take). H100, V2-Lite shape, graph replays, the
# whole MoE at 16K tokens 3,097 / 3,132 / 3,229 us with 8 warps and 3 / 4 / 2 stages against 2,931-3,060
# without; at 8K 1,579 / 1,659 / 1,736 against 1,591-1,653; with 4 warps it did not compile.
PREFILL_CONFIG = dict(block_m=128, block_n1=128, block_n2=256, block_k=64, num_warps=8, num_stages=3, merged=True,
                      tma=True, gate_up_stages=4)


def choose_moe_config(n_assignments: int, n_experts: int) -> dict:
    per_expert = n_assignments / n_experts
    if per_expert < 16:
        return DECODE_CONFIG
    if per_expert < 32:
        return DECODE_WIDE_CONFIG
    if per_expert < 256:
        return dict(PREFILL_CONFIG, block_m=64, block_n1=64, block_n2=128, num_warps=4, merged=False, tma=False,
                    gate_up_stages=3)
    return PREFILL_CONFIG


def moe_shapes(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
               topk_idx_MK: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(M, D, K, E, I) of a routed-experts call (legend above), checking that the weights agree with x:
    gate_up_proj [E, 2I, D], down_proj [E, D, I]."""
    M, D = x_MD.shape
    E, I = down_proj.shape[0], down_proj.shape[2]
    assert gate_up_proj.shape == (E, 2 * I, D) and down_proj.shape == (E, D, I)
    return M, D, topk_idx_MK.shape[1], E, I


def run_moe_gemms(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  topk_weight_MK: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor, cfg: dict,
                  top_k: int, gu_P2I: torch.Tensor | None = None,
                  zero_y: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the two grouped GEMMs over a row layout (sorted_ids, one expert per row block in block_expert)
    -> h_PI (SwiGLU activations per padded row) and y_AD (each assignment's weighted expert output).

    Dense inputs in one dtype. gu_P2I (training) also receives the SwiGLU inputs [gate | up] per row.
    zero_y: rows of assignments in skipped blocks (expert >= E) read as zeros instead of never written.
    Shared by inference (both layouts) and the autograd forward, so all launch the same kernels alike.
    """
    M, D = x_MD.shape
    E, I = down_proj.shape[0], down_proj.shape[2]
    A = M * top_k
    bm, bk, nw, ns = cfg["block_m"], cfg["block_k"], cfg["num_warps"], cfg["num_stages"]
    n_blocks = block_expert.numel()
    h_PI = new_buffer((n_blocks * bm, I), x_MD.dtype, x_MD.device)
    store_gu = gu_P2I is not None
    gu = gu_P2I if store_gu else h_PI   # without STORE_GU the pointer is never written
    bn1, bn2 = cfg["block_n1"], cfg["block_n2"]
    descs = _descriptors(gate_up_proj, down_proj, h_PI, cfg)
    w1_desc, h_desc, w2_desc = descs or (None, None, None)
    _moe_gate_up_kernel[(triton.cdiv(I, bn1), n_blocks)](
        x_MD, gate_up_proj, w1_desc, h_PI, gu, sorted_ids, block_expert,
        x_MD.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), h_PI.stride(0),
        gu_P2I.stride(0) if store_gu else 0, A, D, I, E,
        TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn1, BLOCK_K=bk, UPCAST=INTERPRET, STORE_GU=store_gu,
        MERGED=cfg.get("merged", False), TMA=descs is not None, num_warps=nw,
        num_stages=cfg.get("gate_up_stages", ns), **pdl_launch(x_MD))
    y_AD = torch.zeros((A, D), dtype=x_MD.dtype, device=x_MD.device) if zero_y else new_buffer((A, D), x_MD.dtype,
                                                                                                 x_MD.device)
    weight_A = topk_weight_MK.reshape(-1).contiguous()
    _moe_down_kernel[(triton.cdiv(D, bn2), n_blocks)](
        h_PI, h_desc, down_proj, w2_desc, y_AD, sorted_ids, block_expert, weight_A,
        h_PI.stride(0), down_proj.stride(0), down_proj.stride(1), y_AD.stride(0), A, I, D, E,
        BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=bk, UPCAST=INTERPRET, TMA=descs is not None, num_warps=nw,
        num_stages=ns, **pdl_launch(x_MD))
    return h_PI, y_AD


def _descriptors(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, h_PI: torch.Tensor, cfg: dict):
    """(gate_up weights [E, 2, I, D], h [P, I], down weights [E, D, I]) as TMA descriptors for a `tma`
    config (merged gate_up), or None where any of them cannot be one (then both kernels load by pointer).
    Only 2-byte dtypes: the stage counts are sized for them."""
    if not (cfg.get("tma") and cfg.get("merged") and gate_up_proj.is_contiguous()
            and gate_up_proj.element_size() == 2 and gate_up_proj.dtype == down_proj.dtype == h_PI.dtype):
        return None
    E, D, I = down_proj.shape
    bn1, bk = cfg["block_n1"], cfg["block_k"]
    w1 = tensor_descriptor(gate_up_proj, [E, 2, I, D], [2 * I * D, I * D, D, 1], [1, 2, bn1, bk])
    down = down_descriptors(h_PI, down_proj, cfg["block_m"], cfg["block_n2"], bk)
    return None if w1 is None or down is None else (w1, *down)


def down_descriptors(h_PI: torch.Tensor, down_proj: torch.Tensor, block_m: int, block_n: int, block_k: int):
    """The down GEMM's operands, h [P, I] and the weights [E, D, I], as TMA descriptors of [block_m, block_k]
    and [1, block_n, block_k] boxes, or None where either cannot be one (then its kernel loads both by pointer).
    Shared by the bf16 and the FP8 (w8a8) down kernels."""
    if not down_proj.is_contiguous():
        return None
    E, D, I = down_proj.shape
    descs = (tensor_descriptor(h_PI, [h_PI.shape[0], I], [h_PI.stride(0), 1], [block_m, block_k]),
             tensor_descriptor(down_proj, [E, D, I], [D * I, I, 1], [1, block_n, block_k]))
    return None if any(d is None for d in descs) else descs


def _inference_inputs(x_MD, gate_up_proj, down_proj):
    """Dense rows; fp32 master weights under autocast run in the activations' dtype, as a Linear would
    (no-ops for weights already in x's dtype)."""
    x_MD = x_MD if x_MD.stride(-1) == 1 else x_MD.contiguous()
    return x_MD, gate_up_proj.to(x_MD.dtype).contiguous(), down_proj.to(x_MD.dtype).contiguous()


def _skipped_to_phantom(topk_idx_MK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Negative ids -> expert E, a phantom group whose row blocks the GEMM kernels skip (no host sync)."""
    return torch.where(topk_idx_MK < 0, n_experts, topk_idx_MK)


def add_to_routed(y_MD: torch.Tensor, add_MD: torch.Tensor | None = None,
                  residual_MD: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' output plus `add_MD`, then plus `residual_MD`, each add in y's dtype: the model's
    `h + (experts(x) + shared_experts(x))` (what the combine kernel fuses; the torch paths' last step)."""
    y = y_MD if add_MD is None else y_MD + add_MD
    return y if residual_MD is None else residual_MD + y


def moe_combine_ref(y_AD: torch.Tensor, top_k: int, add_MD: torch.Tensor | None = None,
                    residual_MD: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's K weighted expert rows summed in fp32, rounded to y's dtype, then `add_to_routed`."""
    A, D = y_AD.shape
    y = y_AD.view(A // top_k, top_k, D).sum(dim=1, dtype=torch.promote_types(y_AD.dtype, torch.float32))
    return add_to_routed(y.to(y_AD.dtype), add_MD, residual_MD)


@jit
def _moe_combine_kernel(y_ptr, add_ptr, res_ptr, out_ptr, D, stride_add, stride_res, TOP_K: tl.constexpr,
                        HAS_ADD: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr,
                        INTERPRETED: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(TOP_K):
        acc += tl.load(y_ptr + (m * TOP_K + k) * D + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ADD:
        acc = cast(acc, out_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        acc += tl.load(add_ptr + m * stride_add + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        acc = cast(acc, out_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        acc += tl.load(res_ptr + m * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * D + offs, cast(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def wait_for_add(add_ready, device: torch.device) -> None:
    """Make the current stream wait for `add_ready` (a CUDA event, or None: nothing to wait for)."""
    if add_ready is not None:
        torch.cuda.current_stream(device).wait_event(add_ready)


def moe_combine(y_AD: torch.Tensor, top_k: int, add_MD: torch.Tensor | None = None,
                residual_MD: torch.Tensor | None = None, add_ready=None) -> torch.Tensor:
    """[M*K, D] weighted expert outputs (a token's K rows adjacent) -> [M, D]: their sum, plus `add_MD` (the
    shared experts' output) when given, plus `residual_MD` (the decoder block's residual stream) when given,
    each add rounded as the model rounds it, in one pass (torch needs a reduction, a cast and an add for each).
    Summing adjacent rows is deterministic, unlike atomics in the GEMM. Triton where it runs, the reference
    elsewhere. `add_ready` (a CUDA event): `add_MD` is written on another stream, finished at that event (the
    shared experts running beside the routed ones); the current stream waits for it here, just before the read."""
    wait_for_add(add_ready, y_AD.device)
    if not use_triton(y_AD):
        return moe_combine_ref(y_AD, top_k, add_MD, residual_MD)
    A, D = y_AD.shape
    M = A // top_k
    for t in (add_MD, residual_MD):
        assert t is None or (t.shape == (M, D) and t.stride(-1) == 1 and t.dtype == y_AD.dtype)
    assert y_AD.is_contiguous()
    out = new_buffer((M, D), y_AD.dtype, y_AD.device)
    if M:
        block = min(1024, triton.next_power_of_2(D))
        _moe_combine_kernel[(M, triton.cdiv(D, block))](
            y_AD, add_MD if add_MD is not None else y_AD, residual_MD if residual_MD is not None else y_AD, out, D,
            add_MD.stride(0) if add_MD is not None else 0, residual_MD.stride(0) if residual_MD is not None else 0,
            TOP_K=top_k, HAS_ADD=add_MD is not None, HAS_RES=residual_MD is not None, BLOCK_D=block,
            INTERPRETED=INTERPRET, num_warps=4, **pdl_launch(y_AD))
    return out


def fused_moe_triton(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor, config: dict | None = None,
                     skip_negative: bool = False, add_MD: torch.Tensor | None = None,
                     residual_MD: torch.Tensor | None = None, add_ready=None) -> torch.Tensor:
    M, D, K, E, I = moe_shapes(x_MD, gate_up_proj, down_proj, topk_idx_MK)
    x_MD, gate_up_proj, down_proj = _inference_inputs(x_MD, gate_up_proj, down_proj)
    cfg = config or choose_moe_config(M * K, E)
    if skip_negative:
        sorted_ids, block_expert = moe_align(_skipped_to_phantom(topk_idx_MK, E), E + 1, cfg["block_m"])
    else:
        sorted_ids, block_expert = moe_align(topk_idx_MK, E, cfg["block_m"])
    _, y_AD = run_moe_gemms(x_MD, gate_up_proj, down_proj, topk_weight_MK, sorted_ids, block_expert, cfg, K,
                            zero_y=skip_negative)
    return moe_combine(y_AD, K, add_MD, residual_MD, add_ready)


# Up to this many tokens the unsorted layout pays: 2 tokens x 6 of 64 experts repeat an expert read ~0.6
# times a layer (~3 us of bytes) against ~12 fewer launches; at 4 tokens the two are about even.
# Measured and not taken: both GEMMs in one kernel (a program per assignment and 64-column slice of the expert:
# its gate/up columns, then that slice's share of the down GEMM for all outputs as fp32 partials the combine
# sums). H100, V2-Lite shape, 6 layers a graph: 1 token 46.1 against 47.4 us a layer for these two kernels,
# 2 tokens 84.9 against 71.2, FP8 weights 39.9 / 67.3 against 27.6 / 47.0; through the engine, decode B=1 at 1K
# 3.18 against 2.83 ms a step (FP8 2.86 against 2.34). No variant of 16 (column slices, output tiles, a one-step
# prefetch of the loads, warps, stages, PDL) came within reach.
FEW_TOKENS = 2


def few_token_layout(max_assignments: int, device: torch.device | str) -> torch.Tensor:
    """sorted_ids for up to `max_assignments` (token, expert) assignments with no sorting at all: row
    block a holds assignment a in its first row, the rest padding (id >= any A it serves).

    `fused_moe` first groups assignments by expert (a dozen small kernels) so each expert is read once.
    With one or two tokens experts rarely repeat, so this fixed layout reads about the same bytes with
    2 kernels instead of ~14. Build it once, outside CUDA-graph capture, and pass it to `fused_moe`;
    it serves any A up to `max_assignments` (A row blocks read only its first A * block_m ids).
    """
    bm = DECODE_CONFIG["block_m"]
    p = torch.arange(max_assignments * bm, device=device)
    return torch.where(p % bm == 0, p // bm, max_assignments).to(torch.int32)


def fused_moe_few_tokens_triton(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                                topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor,
                                layout: torch.Tensor, skip_negative: bool = False,
                                add_MD: torch.Tensor | None = None,
                                residual_MD: torch.Tensor | None = None, add_ready=None) -> torch.Tensor:
    """The fused-MoE kernels over `few_token_layout` rows: same kernels, same arithmetic per assignment."""
    M, D = x_MD.shape
    K = topk_idx_MK.shape[1]
    A = M * K
    cfg = FEW_TOKEN_CONFIG
    assert layout.numel() >= A * cfg["block_m"], "the layout was built for fewer assignments"
    x_MD, gate_up_proj, down_proj = _inference_inputs(x_MD, gate_up_proj, down_proj)
    if skip_negative:
        topk_idx_MK = _skipped_to_phantom(topk_idx_MK, gate_up_proj.shape[0])
    block_expert = topk_idx_MK.reshape(-1)            # block a computes assignment a's expert
    # The grid has A row blocks, so only layout[:A * block_m] is read: no slice needed.
    _, y_AD = run_moe_gemms(x_MD, gate_up_proj, down_proj, topk_weight_MK, layout, block_expert, cfg, K,
                            zero_y=skip_negative)
    return moe_combine(y_AD, K, add_MD, residual_MD, add_ready)


def fused_moe(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
              topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor,
              few_token_layout: torch.Tensor | None = None, skip_negative: bool = False,
              add_MD: torch.Tensor | None = None, residual_MD: torch.Tensor | None = None,
              add_ready=None) -> torch.Tensor:
    """Routed experts: y[m] = sum_k w[m,k] down_e(silu(gate_e x[m]) * up_e x[m]), e = topk_idx[m,k].

    x_MD [M,D], gate_up_proj [E,2I,D] rows [gate | up], down_proj [E,D,I] -> [M,D] in x's dtype.
    Forward only (no autograd). Triton on CUDA (CPU under TRITON_INTERPRET=1), the reference elsewhere.
    With a `few_token_layout` (the caller's buffer), up to FEW_TOKENS tokens skip the expert sort.
    With `skip_negative`, assignments whose id is negative are skipped (they add nothing and cost no
    GEMM rows): an expert-parallel rank passes the assignments to other ranks' experts that way.
    `add_MD` [M, D] (the shared experts' output) is added to the result in the same final pass, then
    `residual_MD` [M, D] (the residual stream the block adds the MoE output to), each rounded as the model
    rounds its adds. `add_ready`: the CUDA event after which `add_MD` may be read (see moe_combine).
    """
    M = x_MD.shape[0]
    if M == 0:
        return x_MD.clone()
    if not use_triton(x_MD):
        y = fused_moe_ref(x_MD, gate_up_proj, down_proj, topk_idx_MK, topk_weight_MK)
        wait_for_add(add_ready, x_MD.device)
        return add_to_routed(y, add_MD, residual_MD)
    if few_token_layout is not None and M <= FEW_TOKENS:
        return fused_moe_few_tokens_triton(x_MD, gate_up_proj, down_proj, topk_idx_MK, topk_weight_MK,
                                           few_token_layout, skip_negative, add_MD, residual_MD, add_ready)
    return fused_moe_triton(x_MD, gate_up_proj, down_proj, topk_idx_MK, topk_weight_MK, skip_negative=skip_negative,
                            add_MD=add_MD, residual_MD=residual_MD, add_ready=add_ready)
