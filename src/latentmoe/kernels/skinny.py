"""GEMMs of a few rows (decode at batch 1): x [M, K] @ W^T with W in the compute dtype or in block FP8,
reading each weight once, and two weights that share an input in one launch.

At batch 1 a decode step is a chain of small GEMMs, each too short for cuBLAS's tiles to reach the memory's
bandwidth: in a V2-Lite decode step on an H200, q_proj, o_proj and the shared experts' gate and up (8-13 MB
of bf16 each) took 6.0 us on average, about 2.6x their bytes' time, and the FP8 GEMM's tensor-core tiles
(16 rows, 15 of them padding) took 7.5 us on average for half those bytes. Here one program
owns BLOCK_N output columns for all M rows and streams their weight rows in wide K slices, multiplying on
the CUDA cores in fp32: nothing is padded, and each byte of weight is read once whatever M is.

Two weights reading the same x go in one launch (the programs split between them): MLA's q and kv_a
projections (`skinny_linear_pair`), and the shared experts' gate and up projections, whose programs own the
same columns of both and write silu(gate) * up directly (`skinny_swiglu`, rounding where the model's
`F.silu(gate) * up` of two bf16 GEMM outputs rounds). FP8 weights (e4m3 with a fp32 scale per 128 x 128
tile, kernels/fp8.py) are dequantised in registers: the scale multiplies x's slice, not the tile.

Absorbed MLA decode multiplies every head by its own small matrix (q_nope by W_UK, the attention's latent
output by W_UV): `per_head_matmul`, one program per (head, column block), for the same reason. cuBLAS's
batched GEMM took 3.3 us for each of these 2 MB products in a batch-1 step on an H200, and, launched without
programmatic dependent launch, it also kept its neighbours from overlapping their start with it.

References: `skinny_linear_ref` (F.linear on the dequantised weight, fp32 accumulation) and the
compositions in `skinny_linear_pair` / `skinny_swiglu` when Triton does not run; `per_head_matmul_ref`.
"""
import torch
import torch.nn.functional as F

from ._triton import INTERPRET, cast, jit, new_buffer, pdl_launch, tl, triton, use_triton, wait_for_inputs
from .fp8 import BLOCK, dequantize_fp8_blocks

# Up to this many rows the kernels below run; more rows go to cuBLAS (or the FP8 GEMM), where the weight
# tile is reused across rows on tensor cores. On an H200 at 4 rows the best tiles here only matched cuBLAS
# (and lost to the FP8 tensor-core GEMM), so only batch-1 decode takes them.
SKINNY_MAX_ROWS = 1


def _weight_fp32(w: torch.Tensor, scale_inv: torch.Tensor | None) -> torch.Tensor:
    return w.float() if scale_inv is None else dequantize_fp8_blocks(w, scale_inv, torch.float32)


def skinny_linear_ref(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T in fp32, rounded once to x's dtype (W dequantised when `scale_inv` is given)."""
    return F.linear(x.float(), _weight_fp32(w, scale_inv)).to(x.dtype)


@jit
def _scale_slice(x, s_row, k0, K, BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr):
    """x's K slice [ROWS, BLOCK_K] times its 128-column blocks' weight scales. A slice of whole blocks loads
    one scale per block and broadcasts it (compiled for sm90, the per-column gather it replaces was 32 scalar
    loads a thread for each 2,048-wide slice); a narrower slice gathers a scale per column."""
    if BLOCK_K % SCALE_BLOCK == 0:
        NB: tl.constexpr = BLOCK_K // SCALE_BLOCK
        offs_b = tl.arange(0, NB)
        s = tl.load(s_row + k0 // SCALE_BLOCK + offs_b, mask=offs_b < tl.cdiv(K - k0, SCALE_BLOCK), other=0.0)
        ROWS: tl.constexpr = x.shape[0]
        x3 = tl.reshape(x, [ROWS, NB, SCALE_BLOCK]) * s[None, :, None]
        return tl.reshape(x3, [ROWS, BLOCK_K])
    else:
        offs_k = tl.arange(0, BLOCK_K)
        return x * tl.load(s_row + (k0 + offs_k) // SCALE_BLOCK, mask=offs_k < K - k0, other=0.0)[None, :]


@jit
def _row_rstd(x_ptr, M, K, stride_xm, eps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr):
    """[ROWS] fp32: 1 / sqrt(mean(x^2) + eps) of each row of x (ones unless NORM)."""
    rstd = tl.full([ROWS], 1.0, tl.float32)
    if NORM:
        ss = tl.zeros([ROWS], dtype=tl.float32)
        offs_r = tl.arange(0, ROWS)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            xs = tl.load(x_ptr + offs_r[:, None] * stride_xm + k0 + offs_k[None, :],
                         mask=(offs_r[:, None] < M) & (offs_k[None, :] < K - k0), other=0.0).to(tl.float32)
            ss += tl.sum(xs * xs, 1)
        rstd = 1.0 / tl.sqrt(ss / K + eps)
    return rstd


@jit
def _normed(x, rstd, nw_ptr, k0, mask_k, dtype: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRETED: tl.constexpr):
    """x's slice [ROWS, BLOCK_K] (fp32) as the model's RMSNorm leaves it: weight * (x * rstd).to(dtype), rounded."""
    nw = tl.load(nw_ptr + k0 + tl.arange(0, BLOCK_K), mask=mask_k, other=0.0).to(tl.float32)
    xn = cast(x * rstd[:, None], dtype, INTERPRETED).to(tl.float32)
    return cast(xn * nw[None, :], dtype, INTERPRETED).to(tl.float32)


@jit
def _rows_dot(x_ptr, w_ptr, s_ptr, M, N, K, stride_xm, stride_wn, stride_wk, stride_sn, n0,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr,
              SCALE_BLOCK: tl.constexpr, PDL: tl.constexpr, nw_ptr=None, eps=0.0, NORM: tl.constexpr = False,
              INTERPRETED: tl.constexpr = False):
    """[ROWS, BLOCK_N] fp32: rows 0..M-1 of x times weight rows n0..n0+BLOCK_N-1, over all of K (the weight's
    element [n, k] at n * stride_wn + k * stride_wk: a transposed weight is read in place).

    SCALED: w is e4m3 and its 128 x 128 tiles' scales multiply x's slice (BLOCK_N divides 128, so a
    program's columns share one row of scales). Under programmatic dependent launch (PDL) each weight slice
    is loaded one step ahead, the first before `wait_for_inputs`, so it streams while the previous kernel
    ends; without it the loop is the one the tiles were swept with.

    NORM: x's rows are RMS-normalised on the fly with weight `nw_ptr` (the model's rounding: the normalised
    row rounded to x's dtype, times the weight, rounded again), rstd from a first pass over the row."""
    offs_r = tl.arange(0, ROWS)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_r[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk
    s_row = s_ptr + (n0 // SCALE_BLOCK) * stride_sn
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    if PDL:
        w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < K), other=0.0)
        wait_for_inputs(PDL)
        rstd = _row_rstd(x_ptr, M, K, stride_xm, eps, ROWS, BLOCK_K, NORM)
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            x = tl.load(x_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            if NORM:
                x = _normed(x, rstd, nw_ptr, k0, mask_k, x_ptr.dtype.element_ty, BLOCK_K, INTERPRETED)
            if SCALED:
                x = _scale_slice(x, s_row, k0, K, BLOCK_K, SCALE_BLOCK)
            acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], 2)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
            w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < K - k0 - BLOCK_K), other=0.0)
    else:
        rstd = _row_rstd(x_ptr, M, K, stride_xm, eps, ROWS, BLOCK_K, NORM)
        for k0 in range(0, K, BLOCK_K):
            mask_k = offs_k < K - k0
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            if NORM:
                x = _normed(x, rstd, nw_ptr, k0, mask_k, x_ptr.dtype.element_ty, BLOCK_K, INTERPRETED)
            if SCALED:
                x = _scale_slice(x, s_row, k0, K, BLOCK_K, SCALE_BLOCK)
            acc += tl.sum(x[:, None, :] * w[None, :, :], 2)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
    return acc


@jit
def _store_rows(y_ptr, val, M, N, stride_ym, n0, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_r = tl.arange(0, ROWS)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    tl.store(y_ptr + offs_r[:, None] * stride_ym + offs_n[None, :], val,
             mask=(offs_r[:, None] < M) & (offs_n[None, :] < N))


@jit
def _skinny_kernel(x_ptr, w1_ptr, s1_ptr, y1_ptr, w2_ptr, s2_ptr, y2_ptr, M, N1, N2, K, stride_xm,
                   stride_w1, stride_s1, stride_y1, stride_w2, stride_s2, stride_y2, n1_programs, nw_ptr, eps,
                   MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SCALED: tl.constexpr, SCALE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr,
                   NORM: tl.constexpr):
    """MODE 0: y1 = x W1^T. MODE 1: y1 = x W1^T by the first n1_programs programs, y2 = x W2^T by the rest.
    NORM (modes 0 and 1): x is first RMS-normalised with weight nw (see _rows_dot).
    MODE 2: y1 = silu(x W1^T) * (x W2^T), both rounded to y1's dtype first as two GEMMs' outputs would be.
    Every program's first _rows_dot waits for the previous kernel (PDL), so all of them do."""
    pid = tl.program_id(0)
    dtype = y1_ptr.dtype.element_ty
    if MODE == 2:
        n0 = pid * BLOCK_N
        g = _rows_dot(x_ptr, w1_ptr, s1_ptr, M, N1, K, stride_xm, stride_w1, 1, stride_s1, n0,
                      ROWS, BLOCK_N, BLOCK_K, SCALED, SCALE_BLOCK, PDL)
        u = _rows_dot(x_ptr, w2_ptr, s2_ptr, M, N1, K, stride_xm, stride_w2, 1, stride_s2, n0,
                      ROWS, BLOCK_N, BLOCK_K, SCALED, SCALE_BLOCK, False)
        g = cast(g, dtype, INTERPRETED).to(tl.float32)
        u = cast(u, dtype, INTERPRETED).to(tl.float32)
        a = cast(g / (1.0 + tl.exp(-g)), dtype, INTERPRETED).to(tl.float32)
        _store_rows(y1_ptr, cast(a * u, dtype, INTERPRETED), M, N1, stride_y1, n0, ROWS, BLOCK_N)
    else:
        if pid < n1_programs:
            n0 = pid * BLOCK_N
            y = _rows_dot(x_ptr, w1_ptr, s1_ptr, M, N1, K, stride_xm, stride_w1, 1, stride_s1, n0,
                          ROWS, BLOCK_N, BLOCK_K, SCALED, SCALE_BLOCK, PDL, nw_ptr, eps, NORM, INTERPRETED)
            _store_rows(y1_ptr, cast(y, dtype, INTERPRETED), M, N1, stride_y1, n0, ROWS, BLOCK_N)
        else:
            n0 = (pid - n1_programs) * BLOCK_N
            y = _rows_dot(x_ptr, w2_ptr, s2_ptr, M, N2, K, stride_xm, stride_w2, 1, stride_s2, n0,
                          ROWS, BLOCK_N, BLOCK_K, SCALED, SCALE_BLOCK, PDL, nw_ptr, eps, NORM, INTERPRETED)
            _store_rows(y2_ptr, cast(y, dtype, INTERPRETED), M, N2, stride_y2, n0, ROWS, BLOCK_N)


def choose_skinny_config(M: int, K: int, fp8: bool) -> dict:
    """Tile for M rows of x against weights K wide. From a sweep on an H200 at
    one row over V2-Lite's projections (20 calls per CUDA graph, so launch latency is amortised): K slices of
    2,048 columns and 4 warps won for every shape, 4-row column blocks for bf16 and 8 for e4m3."""
    rows = triton.next_power_of_2(max(M, 1))
    block_k = max(16, min(triton.next_power_of_2(K), 2048 // rows))
    return dict(rows=rows, block_n=8 if fp8 else 4, block_k=block_k, num_warps=4, num_stages=1)


def _usable(x: torch.Tensor, weights, max_rows: int) -> bool:
    """Whether the kernel takes these operands (else the callers compose torch ops)."""
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not use_triton(x) or not 0 < M <= max_rows or x.dtype not in (torch.bfloat16, torch.float16,
                                                                              torch.float32):
        return False
    scaled = {s is not None for _, s in weights}
    if len(scaled) != 1:
        return False
    for w, s in weights:
        if w.dim() != 2 or w.shape[1] != x.shape[-1] or w.stride(1) != 1 or w.device != x.device:
            return False
        if s is None and w.dtype != x.dtype:
            return False
        if s is not None and s.shape != (triton.cdiv(w.shape[0], BLOCK), triton.cdiv(w.shape[1], BLOCK)):
            return False
    return True


def _launch(x, w1, s1, w2, s2, mode: int, config: dict | None, out_dtype: torch.dtype | None = None,
            norm: tuple[torch.Tensor, float] | None = None):
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    M = x2.shape[0]
    N1 = w1.shape[0]
    N2 = w2.shape[0] if w2 is not None else 0
    scaled = s1 is not None
    cfg = config or choose_skinny_config(M, K, scaled)
    bn = cfg["block_n"]
    y1 = new_buffer((M, N1), out_dtype or x.dtype, x.device)
    y2 = new_buffer((M, N2), x.dtype, x.device) if mode == 1 else y1
    n1_programs = triton.cdiv(N1, bn)
    grid = (n1_programs + (triton.cdiv(N2, bn) if mode == 1 else 0),)
    if w2 is None:                  # one weight: the second operand is never read
        w2, s2 = w1, s1
    if not scaled:                  # nor are the scales of unscaled weights
        s1, s2 = w1, w2
    _skinny_kernel[grid](x2, w1, s1, y1, w2, s2, y2, M, N1, N2, K, x2.stride(0),
                         w1.stride(0), s1.stride(0), y1.stride(0), w2.stride(0), s2.stride(0), y2.stride(0),
                         n1_programs, norm[0] if norm else x2, norm[1] if norm else 0.0,
                         MODE=mode, ROWS=cfg["rows"], BLOCK_N=bn, BLOCK_K=cfg["block_k"],
                         SCALED=scaled, SCALE_BLOCK=BLOCK, INTERPRETED=INTERPRET, NORM=norm is not None,
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                         **(pdl_launch(x2) if not scaled else {"PDL": False}))   # (see pdl_launch: FP8 without)
    lead = x.shape[:-1]
    return y1.view(*lead, N1), (y2.view(*lead, N2) if mode == 1 else None)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor | None = None,
                  config: dict | None = None, max_rows: int = SKINNY_MAX_ROWS,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """x [..., K] @ W^T for up to `max_rows` rows of x, W [N, K] in x's dtype or e4m3 with `scale_inv`
    [N/128, K/128]; None where the kernel does not apply (the caller's own GEMM runs instead). The kernel
    serves any few rows; the default limit is where it measured faster than the alternatives. The result
    is rounded once to `out_dtype` (default x's; torch.float32 keeps the fp32 sums, as a router wants)."""
    if not _usable(x, [(w, scale_inv)], max_rows):
        return None
    return _launch(x, w, scale_inv, None, None, 0, config, out_dtype)[0]


def skinny_linear_pair(x: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor | None, w2: torch.Tensor,
                       s2: torch.Tensor | None, config: dict | None = None, max_rows: int = SKINNY_MAX_ROWS,
                       norm: tuple[torch.Tensor, float] | None = None):
    """(x @ W1^T, x @ W2^T) in one launch, or None where the kernel does not apply. `norm` (weight, eps):
    x is RMS-normalised first inside the kernel, rounded as the model's RMSNorm rounds (one launch a layer
    fewer at batch-1 decode: the attention's input norm). Measured on an H100 at V2-Lite's shape, 1K context,
    two engines in one process: 2.780-2.792 ms a batch-1 step against 2.797-2.815 with the norm's own launch
    (0.2-1.1%), greedy tokens identical."""
    if not _usable(x, [(w1, s1), (w2, s2)], max_rows):
        return None
    if norm is not None and (norm[0].shape != (x.shape[-1],) or norm[0].device != x.device
                             or not norm[0].is_contiguous()):
        return None
    return _launch(x, w1, s1, w2, s2, 1, config, norm=norm)


def skinny_swiglu(x: torch.Tensor, w_gate: torch.Tensor, s_gate: torch.Tensor | None, w_up: torch.Tensor,
                  s_up: torch.Tensor | None, config: dict | None = None,
                  max_rows: int = SKINNY_MAX_ROWS) -> torch.Tensor | None:
    """silu(x @ Wg^T) * (x @ Wu^T) in one launch (both products rounded to x's dtype first, as the model's
    two GEMMs would leave them), or None where the kernel does not apply."""
    if w_gate.shape != w_up.shape or not _usable(x, [(w_gate, s_gate), (w_up, s_up)], max_rows):
        return None
    return _launch(x, w_gate, s_gate, w_up, s_up, 2, config)[0]


def skinny_swiglu_ref(x: torch.Tensor, w_gate: torch.Tensor, s_gate: torch.Tensor | None, w_up: torch.Tensor,
                      s_up: torch.Tensor | None) -> torch.Tensor:
    """The composition skinny_swiglu fuses: two GEMMs rounded to x's dtype, silu rounded, the product rounded."""
    g = skinny_linear_ref(x, w_gate, s_gate)
    u = skinny_linear_ref(x, w_up, s_up)
    return F.silu(g) * u


@jit
def per_head_program(x_ptr, w_ptr, y_ptr, h, n_block, B, K, N, stride_xb, stride_xh, stride_wh, stride_wk, stride_wn,
                     stride_yb, stride_yh, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     INTERPRETED: tl.constexpr, PDL: tl.constexpr):
    """y[b, h, n0:n0+BLOCK_N] (n0 = n_block * BLOCK_N) for all B rows: the weight's first K slice loads before
    the wait for x (the weight is no earlier kernel's output), each next slice while the current one is
    multiplied. One program's work in `_per_head_kernel`, and in kernels that run it beside their own
    (norm.py's MLA post-projection)."""
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, ROWS)
    mask_n = offs_n < N
    mask_b = offs_b < B
    w_base = w_ptr + h * stride_wh + offs_n[None, :] * stride_wn
    w = tl.load(w_base + offs_k[:, None] * stride_wk, mask=(offs_k[:, None] < K) & mask_n[None, :], other=0.0)
    wait_for_inputs(PDL)
    acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + h * stride_xh + kk[None, :],
                    mask=mask_b[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
        acc += tl.sum(x[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        nxt = kk + BLOCK_K
        w = tl.load(w_base + nxt[:, None] * stride_wk, mask=(nxt[:, None] < K) & mask_n[None, :], other=0.0)
    tl.store(y_ptr + offs_b[:, None] * stride_yb + h * stride_yh + offs_n[None, :],
             cast(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=mask_b[:, None] & mask_n[None, :])


@jit(do_not_specialize=("B",))
def _per_head_kernel(x_ptr, w_ptr, y_ptr, B, K, N, stride_xb, stride_xh, stride_wh, stride_wk, stride_wn,
                     stride_yb, stride_yh, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     INTERPRETED: tl.constexpr, PDL: tl.constexpr):
    per_head_program(x_ptr, w_ptr, y_ptr, tl.program_id(0), tl.program_id(1), B, K, N, stride_xb, stride_xh,
                     stride_wh, stride_wk, stride_wn, stride_yb, stride_yh, ROWS, BLOCK_K, BLOCK_N, INTERPRETED, PDL)


# Where per_head_matmul runs the kernel above: up to 2 rows, on up to 4 MB of weight. On an H200
# (`bench_kernels.py --per-head`, CUDA-graph replays) V2-Lite's 2 MB products took 1.9 us against cuBLAS's
# 2.9-3.3 at one row, 2.2-2.5 against 3.0-3.3 at two, but 3.3-4.7 against 2.9-3.2 at four (the weight reused
# on CUDA cores, not tensor cores); V2's 16 MB ones (128 heads) were faster in cuBLAS at every row count.
PER_HEAD_MAX_ROWS = 2
PER_HEAD_MAX_BYTES = 4 << 20


def per_head_matmul_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [B, H, K], w [H, K, N] -> [B, H, N]: each head's rows times its own matrix, fp32 sums rounded once."""
    return torch.einsum("bhk,hkn->bhn", x.float(), w.float()).to(x.dtype)


def per_head_kernel_applies(x: torch.Tensor, w: torch.Tensor, max_rows: int = PER_HEAD_MAX_ROWS,
                            max_bytes: int = PER_HEAD_MAX_BYTES) -> bool:
    """Whether x [B, H, K] @ w [H, K, N] runs the few-row kernel (else one batched GEMM)."""
    return (use_triton(x) and 0 < x.shape[0] <= max_rows and w.dtype == x.dtype and w.device == x.device
            and w.numel() * w.element_size() <= max_bytes)


def per_head_tiles(B: int, K: int, N: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_K, BLOCK_N) of the few-row per-head kernel: 8K weight elements a program multiplies per K
    slice (64 fp32 a thread at 4 warps), split between K and N."""
    rows = triton.next_power_of_2(B)
    tile = 8192 // rows
    block_n = min(triton.next_power_of_2(N), max(16, tile // triton.next_power_of_2(K)))
    block_k = min(triton.next_power_of_2(K), max(16, tile // block_n))
    return rows, block_k, block_n


def per_head_matmul(x: torch.Tensor, w: torch.Tensor, max_rows: int = PER_HEAD_MAX_ROWS,
                    max_bytes: int = PER_HEAD_MAX_BYTES) -> torch.Tensor:
    """x [B, H, K] @ w [H, K, N] per head -> [B, H, N] contiguous, in x's dtype; `w` may be any strided view
    (absorbed decode passes W_UK [H, N, C] as is and W_UV [H, V, C] transposed). Inference only: up to
    `max_rows` rows of a weight of at most `max_bytes` the few-row kernel, else one batched GEMM
    writing straight into [B, H, N] order."""
    B, H, K = x.shape
    N = w.shape[2]
    if w.shape[:2] != (H, K):
        raise ValueError(f"per_head_matmul: x {tuple(x.shape)} does not match w {tuple(w.shape)}")
    out = new_buffer((B, H, N), x.dtype, x.device)
    if per_head_kernel_applies(x, w, max_rows, max_bytes):
        x = x if x.stride(-1) == 1 else x.contiguous()
        rows, block_k, block_n = per_head_tiles(B, K, N)
        _per_head_kernel[(H, triton.cdiv(N, block_n))](
            x, w, out, B, K, N, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
            out.stride(0), out.stride(1), ROWS=rows, BLOCK_K=block_k, BLOCK_N=block_n, INTERPRETED=INTERPRET,
            num_warps=4, **pdl_launch(x))
        return out
    # The batched GEMM's [H, B, N] result written through a transposed view of out (a plain bmm would leave
    # [H, B, N] for the caller to copy into [B, H, N]). out= takes no autograd inputs.
    torch.bmm(x.detach().transpose(0, 1), w.detach(), out=out.transpose(0, 1))
    return out


__all__ = ["SKINNY_MAX_ROWS", "PER_HEAD_MAX_ROWS", "PER_HEAD_MAX_BYTES", "per_head_matmul", "per_head_matmul_ref", "skinny_linear", "skinny_linear_pair", "skinny_swiglu", "skinny_linear_ref",
           "skinny_swiglu_ref", "choose_skinny_config"]
