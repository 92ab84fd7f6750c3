"""FP8 (e4m3) weights: block quantisation, per-token activation quantisation, and the scaled GEMM.

Weights are stored as DeepSeek's FP8 releases store them: `weight` in float8_e4m3fn and
`weight_scale_inv` [ceil(N/128), ceil(K/128)] fp32, one scale per 128 x 128 tile, so that
w ~= weight.float() * weight_scale_inv (per tile). The scale is the tile's amax / 448 (e4m3's
largest finite value): every tile uses the format's full range, and one outlier costs only its own
tile's precision (per-output-channel scales let it cost a whole row). On the trained demo model the two
tie (perplexity +0.09% vs +0.05% of fp32, benchmarks/results/fp8_quality.md); blocks win on format:
DeepSeek's FP8 checkpoints load as stored.

`fp8_linear` computes x @ w^T with these weights. Few rows (decode, bandwidth-bound) read the fp8 tiles and
multiply in x's dtype (weights dequantised in registers; up to 4 rows kernels/skinny.py does it better). More
rows (large decode batches, prefill) quantise x per token and 128 columns (`quantize_fp8_groups`) and run
torch's blockwise-scaled GEMM on fp8 tensor cores, DeepSeek's recipe, where the widths are whole 128-blocks;
for other widths, or without that GEMM, the weight is dequantised in one pass for an ordinary GEMM. The
Triton GEMM's own fp8-activation branch (each 128-deep partial product scaled) measured slower than cuBLAS
bf16 and is opt-in. Elsewhere the reference dequantises the weight and calls F.linear, rounding x through
fp8 at the sizes where the GPU would.
"""
import torch
import torch.nn.functional as F

from ._triton import INTERPRET, dot, jit, new_buffer, tl, triton, use_triton

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128            # weight tile side and activation group width
_TINY = 1e-12          # scale floor: an all-zero tile quantises to zeros, not NaN


def quantize_fp8_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (float8_e4m3fn [..., N, K], scale_inv fp32 [..., ceil(N/block), ceil(K/block)])."""
    *lead, N, K = w.shape
    nb, kb = -(-N // block), -(-K // block)
    wf = F.pad(w.float(), (0, kb * block - K, 0, nb * block - N))
    tiles = wf.view(*lead, nb, block, kb, block)
    scale = (tiles.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp_min(_TINY)           # [..., nb, kb]
    q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(*lead, nb * block, kb * block)[..., :N, :K].contiguous(), scale


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                          block: int = BLOCK) -> torch.Tensor:
    """The weight a block-FP8 pair stands for: q [..., N, K] * its tile's scale, in `dtype`."""
    N, K = q.shape[-2:]
    s = scale_inv.float().repeat_interleave(block, dim=-2)[..., :N, :].repeat_interleave(block, dim=-1)[..., :K]
    return (q.float() * s).to(dtype)


def quantize_fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel alternative: w [..., N, K] -> (fp8, scale [..., N, 1]); for the accuracy comparison."""
    scale = (w.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_TINY)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_fp8_groups_ref(x: torch.Tensor, group: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], scale fp32 [M, ceil(K/group)]): one scale per token and `group` columns."""
    M, K = x.shape
    g = -(-K // group)
    xf = F.pad(x.float(), (0, g * group - K)).view(M, g, group)
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp_min(_TINY)
    q = (xf / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(M, g * group)[:, :K].contiguous(), scale


def round_through_fp8_groups(x: torch.Tensor, group: int = BLOCK) -> torch.Tensor:
    """x [M, K] in fp32 as the FP8 tensor-core paths see it: quantised per token and `group` columns, and back."""
    q, s = quantize_fp8_groups_ref(x, group)
    return q.float() * s.repeat_interleave(group, dim=-1)[:, :x.shape[1]]


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                   quantize_input: bool = False) -> torch.Tensor:
    """x [..., K] @ dequant(weight)^T (+ bias) in x's dtype; with `quantize_input` x is first rounded
    through the per-token fp8 groups the fast path's tensor-core branch uses."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if quantize_input:
        x2 = round_through_fp8_groups(x2)
    w = dequantize_fp8_blocks(weight, scale_inv, torch.float32)
    y = F.linear(x2.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype).view(*shape[:-1], weight.shape[0])


@jit
def to_fp8(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x (fp32, already within +-448) cast to the e4m3 `dtype`, rounding to nearest even.

    The GPU's cast is used as is. Triton's CPU interpreter rounds wrongly where rounding carries into the
    exponent (124.7 -> 64, not 128), so there x is first rounded onto the e4m3 grid in fp32 (3 mantissa
    bits; steps of 2^-9 below 2^-6, the subnormals), which the cast then keeps exactly."""
    if INTERPRETED:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576          # keep sign, exponent, 3 mantissa bits
        normal = bits.to(tl.float32, bitcast=True)
        x = tl.where(tl.abs(x) < 0.015625, (x + 24576.0) - 24576.0, normal)
    return x.to(dtype)


@jit(do_not_specialize=("M",))
def _quantize_groups_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg, ROWS: tl.constexpr,
                            GROUP: tl.constexpr, GROUPS: tl.constexpr, FP8_MAX_C: tl.constexpr,
                            INTERPRETED: tl.constexpr):
    """ROWS whole rows per program, seen as [ROWS, GROUPS, GROUP]: one pass, a scale per row and group."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    gi = tl.arange(0, GROUPS)
    offs = gi[:, None] * GROUP + tl.arange(0, GROUP)[None, :]                          # [GROUPS, GROUP]
    mask = (r[:, None, None] < M) & (offs[None, :, :] < K)
    rows = r[:, None, None].to(tl.int64)
    x = tl.load(x_ptr + rows * stride_xm + offs[None, :, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 2) / FP8_MAX_C, 1e-12)                       # [ROWS, GROUPS]
    q = tl.minimum(tl.maximum(x / scale[:, :, None], -FP8_MAX_C), FP8_MAX_C)
    tl.store(q_ptr + rows * stride_qm + offs[None, :, :], to_fp8(q, q_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    tl.store(s_ptr + r[:, None] * stride_sm + gi[None, :] * stride_sg, scale,
             mask=(r[:, None] < M) & (gi[None, :] * GROUP < K))


def quantize_fp8_groups(x: torch.Tensor, group: int = BLOCK,
                        scale_outer_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], scale [M, ceil(K/group)]), one kernel on the Triton path.
    `scale_outer_major`: the scale's storage is [ceil(K/group), M] (strides (1, M)), as torch's blockwise
    scaled GEMM reads it."""
    if not use_triton(x):
        q, s = quantize_fp8_groups_ref(x, group)
        return q, (s.t().contiguous().t() if scale_outer_major else s)
    M, K = x.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    g = triton.cdiv(K, group)
    q = new_buffer((M, K), FP8, x.device)
    s = new_buffer((g, M), torch.float32, x.device).t() if scale_outer_major else \
        new_buffer((M, g), torch.float32, x.device)
    groups = triton.next_power_of_2(g)
    rows = max(1, min(16, 8192 // (groups * group)))       # about 8K elements a program
    if M:
        _quantize_groups_kernel[(triton.cdiv(M, rows),)](x, q, s, M, K, x.stride(0), q.stride(0), s.stride(0),
                                                         s.stride(1), ROWS=rows, GROUP=group, GROUPS=groups,
                                                         FP8_MAX_C=FP8_MAX, INTERPRETED=INTERPRET, num_warps=4)
    return q, s


@jit
def _fp8_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, bias_ptr, M, N, K,
                     stride_am, stride_asm, stride_wn, stride_wsn, stride_cm,
                     A_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr, UPCAST: tl.constexpr):
    """c[m, n] = sum over 128-deep slices k of (a[m, k] . w[n, k]) * w_scale[n/128, k/128] (* a_scale[m, k/128])."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]          # [BLOCK_K, BLOCK_N]
    ws_ptrs = ws_ptr + (offs_n // SCALE_BLOCK) * stride_wsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        ws = tl.load(ws_ptrs + k0 // SCALE_BLOCK, mask=mask_n, other=0.0)                # [BLOCK_N]
        if A_FP8:
            sa = tl.load(as_ptr + offs_m * stride_asm + k0 // SCALE_BLOCK, mask=mask_m, other=0.0)
            acc += dot(a, w, UPCAST) * sa[:, None] * ws[None, :]
        else:   # dequantise the tile (scale folded in) and accumulate in place: no second accumulator
            acc += dot(a, (w.to(tl.float32) * ws[None, :]).to(a.dtype), UPCAST)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# Up to this many rows the weights dominate (decode): read fp8, multiply in x's dtype. Above it the
# product is compute-bound: torch's blockwise scaled GEMM where the weight's shape allows it (below), else
# the weight dequantised once (one bandwidth-bound pass over N x K) and cuBLAS's GEMM in x's dtype. The
# fp8-activation branch of the kernel (per-token fp8 groups on fp8 tensor cores, quantize_input=True)
# measured 0.49-0.55x of cuBLAS bf16 on an H200 at 256 and 8192 rows (benchmarks/results/fp8.md), so it
# is not the default.
FP8_ACTIVATION_MIN_ROWS = 64


@jit
def _dequantize_blocks_kernel(q_ptr, s_ptr, w_ptr, N, K, stride_qn, stride_sn, stride_wn, BLOCK_C: tl.constexpr):
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    offs_n = pn * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = pk * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    q = tl.load(q_ptr + offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :], mask=mask, other=0.0)
    s = tl.load(s_ptr + pn * stride_sn + pk)
    tl.store(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :],
             (q.to(tl.float32) * s).to(w_ptr.dtype.element_ty), mask=mask)


def dequantize_fp8_blocks_triton(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_fp8_blocks for a 2-D weight in one kernel (one program per 128 x 128 tile)."""
    N, K = q.shape
    assert q.stride(-1) == 1 and scale_inv.shape == (triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK))
    w = new_buffer((N, K), dtype, q.device)
    _dequantize_blocks_kernel[(triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK))](
        q, scale_inv, w, N, K, q.stride(0), scale_inv.stride(0), w.stride(0), BLOCK_C=BLOCK, num_warps=4)
    return w


def choose_gemm_config(M: int, N: int) -> dict:
    if M <= FP8_ACTIVATION_MIN_ROWS:
        # Narrow tiles so that even N = 576 spreads over enough programs to keep the bandwidth busy.
        return dict(block_m=16, block_n=32 if N >= 4096 else 16, block_k=128, num_warps=4, num_stages=4)
    return dict(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)


def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                      bias: torch.Tensor | None = None, config: dict | None = None,
                      quantize_input: bool = False) -> torch.Tensor:
    shape = x.shape
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    M = x2.shape[0]
    cfg = config or choose_gemm_config(M, N)
    assert BLOCK % cfg["block_k"] == 0 and scale_inv.shape == (triton.cdiv(N, BLOCK), triton.cdiv(K, BLOCK))
    a_fp8 = bool(quantize_input)
    a, a_scale = quantize_fp8_groups(x2) if a_fp8 else (x2, x2)
    out = new_buffer((M, N), x.dtype, x.device)
    if M:
        grid = (triton.cdiv(N, cfg["block_n"]), triton.cdiv(M, cfg["block_m"]))
        _fp8_gemm_kernel[grid](a, a_scale, weight, scale_inv, out, bias if bias is not None else out, M, N, K,
                               a.stride(0), a_scale.stride(0) if a_fp8 else 0, weight.stride(0), scale_inv.stride(0),
                               out.stride(0), A_FP8=a_fp8, HAS_BIAS=bias is not None,
                               BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"],
                               SCALE_BLOCK=BLOCK, UPCAST=INTERPRET,
                               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out.view(*shape[:-1], N)


# From this many rows (above the few-row kernel's) a GEMM runs on FP8 tensor cores through torch's blockwise
# scaled GEMM, x quantised per token and 128 columns (DeepSeek's own recipe). On an H200, quantisation included,
# against cuBLAS bf16: 1.05-1.16x at 2,048 rows and 1.23-1.28x at 8,192 for V2-Lite's q_proj, o_proj and shared
# gate/up; 0.81-0.98x at 512-1,024 rows; and 0.61-0.89x for kv_a's 576 output rows at any size. What it
# replaces below 2,048 rows is not cuBLAS bf16 but the weight dequantised by one kernel first: H100, graph
# replays, V2-Lite's q_proj, o_proj, shared gate and up at 256 rows 10.8-10.9 us each against 10.9-12.9 (bf16
# 7.0-8.2), at 512 and 1,024 rows the whole layer's Linears 55.5 / 77.3 us against 86.8 / 118.4 (bf16 62.3 /
# 88.6); whole decode steps of an FP8 engine (one process, engines alternating, 1K context): B=256 12.72-12.73
# against 12.98-12.99 ms, B=128 10.81-10.83 against 10.97-10.98, B=1 to 64 unchanged (at most 64 rows stay on
# the few-row kernels). torch's kernel wants the weight's K in whole groups of four 128-blocks (the shared
# experts' K of 2,816 is refused).
# Padding that K to 3,072 measured little (H100, graph replays, x's quantisation included, its padding not):
# 114 / 219 us at 8,192 / 16,384 rows against 128 / 250 for today's dequantise + bf16 GEMM (the Triton w8a8
# GEMM 169 / 367), about 0.4 ms over an 8K prefill's 26 MoE layers before a padded copy of x; kv_a stays best in
# bf16 (31 us dequantise + GEMM, 46 padded to 640 rows of weight, 61 Triton, 8,192 rows). Not taken.
FP8_SCALED_MM_MIN_ROWS = FP8_ACTIVATION_MIN_ROWS + 1


def uses_fp8_dense_activations(rows: int, weight_shape) -> bool:
    """Whether fp8_linear quantises x for this many rows and this weight: the rule the GPU path follows, which
    the CPU reference path mirrors (so a CPU run rounds where a GPU would)."""
    N, K = weight_shape
    return rows >= FP8_SCALED_MM_MIN_ROWS and N % BLOCK == 0 and K % (4 * BLOCK) == 0


def _blockwise_scaled_mm(x2: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor | None:
    """torch's blockwise-scaled FP8 GEMM (1 x 128 activation groups, 128 x 128 weight tiles), or None where this
    torch or GPU lacks it."""
    if not (x2.is_cuda and hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")
            and torch.cuda.get_device_capability(x2.device) >= (9, 0)):
        return None
    M = x2.shape[0]
    # cuBLAS refused (NOT_SUPPORTED) a row count that was not a multiple of 16 where multiples ran: zero rows
    # pad x, and their outputs are dropped.
    pad = -M % 16
    a, a_scale = quantize_fp8_groups(F.pad(x2, (0, 0, 0, pad)) if pad else x2, scale_outer_major=True)
    # b = W^T [K, N] (column-major view of the stored weight); its tile scales [K/128, N/128] as a view too.
    y = F.scaled_mm(a, weight.t(), a_scale, F.ScalingType.BlockWise1x128, scale_inv.t(),
                    F.ScalingType.BlockWise128x128, output_dtype=x2.dtype)[:M]
    return y if bias is None else y + bias


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) for a block-FP8 W (weight [N, K] e4m3, scale_inv [N/128, K/128]) -> x's dtype.

    Triton on CUDA (CPU under TRITON_INTERPRET=1): the FP8 GEMM for up to FP8_ACTIVATION_MIN_ROWS rows; above
    them, for weights of whole 128-blocks (uses_fp8_dense_activations), x quantised and torch's blockwise scaled
    GEMM where this GPU and torch have it; otherwise the weight dequantised by one kernel and an ordinary GEMM.
    The dequantising reference elsewhere, rounding x through fp8 where the GPU path would."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fp8_acts = uses_fp8_dense_activations(rows, weight.shape)
    if not use_triton(x):
        return fp8_linear_ref(x, weight, scale_inv, bias, quantize_input=fp8_acts)
    if rows <= FP8_ACTIVATION_MIN_ROWS:
        return fp8_linear_triton(x, weight, scale_inv, bias, quantize_input=False)
    if fp8_acts:
        x2 = x.reshape(rows, x.shape[-1])
        y = _blockwise_scaled_mm(x2 if x2.stride(-1) == 1 else x2.contiguous(), weight, scale_inv, bias)
        if y is not None:
            return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, dequantize_fp8_blocks_triton(weight, scale_inv, x.dtype), bias)


__all__ = ["FP8", "FP8_MAX", "BLOCK", "quantize_fp8_blocks", "dequantize_fp8_blocks", "quantize_fp8_rows",
           "quantize_fp8_groups", "quantize_fp8_groups_ref", "round_through_fp8_groups", "fp8_linear",
           "fp8_linear_ref", "fp8_linear_triton",
           "FP8_ACTIVATION_MIN_ROWS", "FP8_SCALED_MM_MIN_ROWS", "uses_fp8_dense_activations", "to_fp8",
           "dequantize_fp8_blocks_triton"]
