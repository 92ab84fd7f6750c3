"""RMSNorm (alone, or after the residual add), and MLA's post-projection (c_KV norm + RoPE of q_pe and
k_pe), one Triton kernel each. At batch-1/2 decode the post-projection's launch also runs absorbed attention's
W_UK product (q_lat = W_UK^T q_nope per head), which reads only q_nope: one launch a layer fewer.

A decode step at small batch is bound by the number of kernels, not by bytes: the model's plain
RMSNorm is ~7 elementwise kernels, each RoPE ~9. These compute the same formulas (fp32 statistics
and rotation, the reference's rounding order) in one launch per call. Forward only.
"""
import torch

from ._triton import INTERPRET, cast, jit, new_buffer, pdl_launch, tl, triton, use_triton, wait_for_inputs
from .reference import mla_post_projection_ref, rms_norm_ref, write_latent_cache_ref
from .skinny import per_head_kernel_applies, per_head_matmul, per_head_program, per_head_tiles


@jit
def rms_normed(x, w_ptr, offs, mask, N, eps, x_dtype: tl.constexpr, y_dtype: tl.constexpr):
    """One row x (fp32, the values of an x_dtype row) normalised: w * (x * rstd).to(x_dtype), statistics in fp32,
    in y_dtype (the reference's rounding order). Shared by the kernels here and the router's add-and-norm."""
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    xn = (x * rstd).to(x_dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (w * xn).to(y_dtype)


@jit
def _rms_norm_row(x_ptr, w_ptr, y_ptr, offs, mask, N, eps):
    """One row from memory to memory (`rms_normed`)."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, rms_normed(x, w_ptr, offs, mask, N, eps, x_ptr.dtype.element_ty, y_ptr.dtype.element_ty),
             mask=mask)


@jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, N, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    _rms_norm_row(x_ptr + row * stride_x, w_ptr, y_ptr + row * stride_y, offs, offs < N, N, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), x [..., N] -> same shape.

    Triton on CUDA (CPU under TRITON_INTERPRET=1), `rms_norm_ref` elsewhere.
    """
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps)
    shape, N = x.shape, x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = new_buffer(x2.shape, torch.promote_types(x.dtype, weight.dtype), x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), N, eps,
                                         BLOCK=triton.next_power_of_2(N), num_warps=4 if N >= 1024 else 1,
                                         **pdl_launch(x2))
    return y.view(shape)


def add_rms_norm_ref(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """The decoder block's residual add and the next norm: (h + delta, rms_norm(h + delta)), the sum in h's dtype."""
    s = h + delta
    return s, rms_norm_ref(s, weight, eps)


@jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, s_ptr, y_ptr, stride_h, stride_d, stride_s, stride_y, N, eps,
                         BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(s_ptr + row * stride_s + offs, cast(h + d, s_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    # The norm reads the rounded sum back (this program's own stores: visible to it).
    _rms_norm_row(s_ptr + row * stride_s, w_ptr, y_ptr + row * stride_y, offs, mask, N, eps)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    """(h + delta, rms_norm(h + delta)) for h, delta [..., N] of one shape and dtype, in one pass: the
    residual stream after a sublayer and the next sublayer's input (two launches and passes in torch).
    Triton on CUDA (CPU under TRITON_INTERPRET=1), `add_rms_norm_ref` elsewhere."""
    if not use_triton(h) or h.shape != delta.shape or h.dtype != delta.dtype:
        return add_rms_norm_ref(h, delta, weight, eps)
    shape, N = h.shape, h.shape[-1]
    h2, d2 = h.reshape(-1, N), delta.reshape(-1, N)
    h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
    d2 = d2 if d2.stride(-1) == 1 else d2.contiguous()
    s = new_buffer(h2.shape, h.dtype, h.device)
    y = new_buffer(h2.shape, torch.promote_types(h.dtype, weight.dtype), h.device)
    if h2.shape[0]:
        _add_rms_norm_kernel[(h2.shape[0],)](h2, d2, weight, s, y, h2.stride(0), d2.stride(0), s.stride(0), y.stride(0),
                                             N, eps, BLOCK=triton.next_power_of_2(N), INTERPRETED=INTERPRET,
                                             num_warps=4 if N >= 1024 else 1, **pdl_launch(h2))
    return s.view(shape), y.view(shape)


@jit
def _rope_rows(ptr, offs_r, mask_r, stride_row, cos, sin, R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Rows ptr + offs_r * stride_row (R elements each) with their interleaved pairs (x[2i], x[2i+1]) rotated
    in fp32 by the angles of cos / sin [BLOCK_P], rounded to ptr's dtype -> (rows [ROWS, 2 BLOCK_P], their
    offsets from ptr, mask) for the caller's stores. Each row is read as one contiguous run and split into
    its pairs in registers: loading every second element took a prefill's post-projection kernel to about a
    quarter of the memory's bandwidth."""
    offs = tl.arange(0, 2 * BLOCK_P)
    mask = mask_r[:, None] & (offs < R)[None, :]
    where = offs_r[:, None] * stride_row + offs[None, :]
    x = tl.load(ptr + where, mask=mask, other=0.0).to(tl.float32)
    x0, x1 = tl.split(tl.reshape(x, [x.shape[0], BLOCK_P, 2]))
    dtype = ptr.dtype.element_ty
    y = tl.join((x0 * cos[None, :] - x1 * sin[None, :]).to(dtype), (x0 * sin[None, :] + x1 * cos[None, :]).to(dtype))
    return tl.reshape(y, [x.shape[0], 2 * BLOCK_P]), where, mask


@jit(do_not_specialize=("M", "absorb_rows"))
def _mla_post_kernel(q_ptr, kv_ptr, w_ptr, ckv_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr,
                     stride_q, stride_kv, stride_ckv, stride_cache_blk, stride_cache_tok, eps,
                     wuk_ptr, qlat_ptr, M, absorb_rows, stride_uk_h, stride_uk_k, stride_uk_c, stride_lat_b,
                     stride_lat_h,
                     H: tl.constexpr, DQ: tl.constexpr, N: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, PAGE: tl.constexpr,
                     WRITE_CACHE: tl.constexpr, ABSORB: tl.constexpr, UK_BLOCKS: tl.constexpr,
                     UK_ROWS: tl.constexpr, UK_BLOCK_K: tl.constexpr, UK_BLOCK_C: tl.constexpr,
                     INTERPRETED: tl.constexpr, PDL: tl.constexpr):
    """Programs 0..M-1, one token each: c_kv = RMSNorm(kv[:C]) into ckv; RoPE on kv[C:C+R] and on every
    head's q[N:N+R], in place; with WRITE_CACHE, [c_kv | k_pe] also into the paged cache's row at slot_ptr[m]
    (negative: padding, none). With ABSORB, the programs after them compute q_lat[b, h] = q_nope[b, h] @ W_UK[h]
    for the first `absorb_rows` tokens, UK_BLOCKS column blocks a head (skinny.per_head_program): they read
    only q[:, h, :N], which the token programs leave as it is."""
    pid = tl.program_id(0)
    if ABSORB:
        if pid >= M:
            j = pid - M
            per_head_program(q_ptr, wuk_ptr, qlat_ptr, j // UK_BLOCKS, j % UK_BLOCKS, absorb_rows, N, C, stride_q, DQ,
                             stride_uk_h, stride_uk_k, stride_uk_c, stride_lat_b, stride_lat_h, UK_ROWS, UK_BLOCK_K,
                             UK_BLOCK_C, INTERPRETED, PDL)
            return
    wait_for_inputs(PDL)
    m = pid
    offs_c = tl.arange(0, BLOCK_C)
    _rms_norm_row(kv_ptr + m * stride_kv, w_ptr, ckv_ptr + m * stride_ckv, offs_c, offs_c < C, C, eps)
    # RoPE: cos/sin [R/2] of this token's position, shared by k_pe and every head of q_pe
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < R // 2
    cos = tl.load(cos_ptr + m * (R // 2) + offs_p, mask=mp, other=0.0)
    sin = tl.load(sin_ptr + m * (R // 2) + offs_p, mask=mp, other=0.0)
    one = tl.arange(0, 1)
    kv_pe = kv_ptr + m * stride_kv + C
    k_pe, where, mask = _rope_rows(kv_pe, one, one < 1, 0, cos, sin, R, BLOCK_P)
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + m).to(tl.int64)
        if slot >= 0:
            row = cache_ptr + (slot // PAGE) * stride_cache_blk + (slot % PAGE) * stride_cache_tok
            _rms_norm_row(kv_ptr + m * stride_kv, w_ptr, row, offs_c, offs_c < C, C, eps)
            tl.store(row + C + where, k_pe.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(kv_pe + where, k_pe, mask=mask)
    offs_h = tl.arange(0, BLOCK_H)
    q_pe = q_ptr + m * stride_q + N
    q_rot, where, mask = _rope_rows(q_pe, offs_h, offs_h < H, DQ, cos, sin, R, BLOCK_P)
    tl.store(q_pe + where, q_rot, mask=mask)


def mla_post_projection(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                        cos: torch.Tensor, sin: torch.Tensor, n_heads: int, kv_cache: torch.Tensor | None = None,
                        slot_mapping: torch.Tensor | None = None, w_uk: torch.Tensor | None = None,
                        absorb_rows: int = 0):
    """MLA after its projections: q [M, H*(N+R)], kv [M, C+R] (dense rows), cos/sin [M, R/2] fp32 contiguous
    -> q_nope [M,H,N], q_pe [M,H,R] (rotated), c_kv [M,C] (RMS-normed, new), k_pe [M,R] (rotated).

    With `kv_cache` [NB, BS, C+R] and `slot_mapping` [M], each token's [c_kv | k_pe] is also stored at its
    slot, as write_latent_cache stores it, in the same launch (one kernel a layer fewer).
    With `w_uk` [H, N, C] (any strided view), a fifth result: q_lat [absorb_rows, H, C] = per_head_matmul(
    q_nope[:absorb_rows], w_uk), absorbed decode's queries for the first rows; in the same launch where
    per_head_matmul would run its few-row kernel, else by per_head_matmul after it.
    The Triton path (CUDA; CPU under TRITON_INTERPRET=1) rotates q and kv in place and returns views of
    them; `mla_post_projection_ref` elsewhere. Callers hand over fresh projections they do not reuse.
    """
    write = kv_cache is not None
    if write:
        assert slot_mapping is not None and kv_cache.shape[-1] == kv.shape[-1] and kv_cache.stride(-1) == 1
    absorb = w_uk is not None
    if not use_triton(q):
        out = mla_post_projection_ref(q, kv, norm_weight, eps, cos, sin, n_heads)
        if write:
            write_latent_cache_ref(kv_cache, slot_mapping, out[2], out[3])
        return out if not absorb else (*out, per_head_matmul(out[0][:absorb_rows], w_uk))
    M, R = q.shape[0], 2 * cos.shape[-1]
    C = kv.shape[-1] - R
    DQ = q.shape[-1] // n_heads
    N = DQ - R
    assert q.stride(-1) == 1 and kv.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert absorb_rows <= M
    q3 = q.view(M, n_heads, DQ)
    c_kv = new_buffer((M, C), torch.promote_types(kv.dtype, norm_weight.dtype), kv.device)
    # W_UK's product in this launch where per_head_matmul would take its few-row kernel (the same tiles).
    fuse = absorb and per_head_kernel_applies(q3[:absorb_rows, :, :N], w_uk)
    if fuse:
        assert w_uk.shape == (n_heads, N, w_uk.shape[2])
        q_lat = new_buffer((absorb_rows, n_heads, w_uk.shape[2]), q.dtype, q.device)
        uk_rows, uk_block_k, uk_block_c = per_head_tiles(absorb_rows, N, q_lat.shape[2])
        uk_blocks = triton.cdiv(q_lat.shape[2], uk_block_c)
    if M:
        cache = kv_cache if write else c_kv
        _mla_post_kernel[(M + (n_heads * uk_blocks if fuse else 0),)](
            q, kv, norm_weight, c_kv, cos, sin, cache, slot_mapping.contiguous() if write else cos,
            q.stride(0), kv.stride(0), c_kv.stride(0), cache.stride(0) if write else 0,
            cache.stride(1) if write else 0, eps,
            w_uk if fuse else q, q_lat if fuse else q, M, absorb_rows,
            *(w_uk.stride() if fuse else (0, 0, 0)), *(q_lat.stride()[:2] if fuse else (0, 0)),
            H=n_heads, DQ=DQ, N=N, C=C, R=R, BLOCK_H=triton.next_power_of_2(n_heads),
            BLOCK_C=triton.next_power_of_2(C), BLOCK_P=triton.next_power_of_2(R // 2),
            PAGE=kv_cache.shape[1] if write else 1, WRITE_CACHE=write, ABSORB=fuse,
            UK_BLOCKS=uk_blocks if fuse else 1, UK_ROWS=uk_rows if fuse else 1,
            UK_BLOCK_K=uk_block_k if fuse else 16, UK_BLOCK_C=uk_block_c if fuse else 16,
            INTERPRETED=INTERPRET, num_warps=4, **pdl_launch(q))
    out = q3[..., :N], q3[..., N:], c_kv, kv[:, C:]
    if not absorb:
        return out
    return (*out, q_lat if fuse else per_head_matmul(out[0][:absorb_rows], w_uk))


__all__ = ["rms_norm", "add_rms_norm", "add_rms_norm_ref", "mla_post_projection"]
