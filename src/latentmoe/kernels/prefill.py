"""Batched prefill attention (Triton): every prompt chunk of a step in one launch, variable lengths.

Chunk p has q_len new queries and k_len keys: its cached prefix (k_len - q_len tokens) followed by
itself. Query i of the chunk sits at position prefix + i and sees keys 0..prefix + i: full over the
prefix, causal inside the chunk. No mask is ever materialised; the lengths arrive as cumulative
offsets (cu_q, cu_k) like flash-attention's varlen form, so one call serves any mix of chunks.

MLA keys come in two parts: k_nope per head [S, H, N] (decompressed from the latent) and the rotated
k_pe [S, R], shared by all heads (stride 0 over heads; a per-head cache passes its own [S, H, R]).
The scores are q_nope.k_nope + q_pe.k_pe, so neither queries nor keys are ever concatenated.
Its integer arguments are the model's constants (strides, heads); what varies from step to step (the
chunk lengths) is device data and the grid. So one compiled kernel serves every batch the engine can
form, and Triton may still specialise the strides (16-divisible: aligned, vectorised loads).
"""
import torch

from ._triton import INTERPRET, dot, jit, new_buffer, tl, triton, use_triton
from .reference import prefill_attention_ref

LOG2E = 1.4426950408889634


@jit
def _attend_tile(acc, m_i, l_i, q, qpe, k_ptr, kpe_ptr, v_ptr, rows_k, mask_n, offs_m, offs_n, prefix, h,
                 stride_km, stride_kh, stride_em, stride_eh, stride_vm, stride_vh, qk_scale,
                 offs_dn, offs_dr, offs_dv, N: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
                 CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile of the online softmax. CAUSAL: the tile crosses the diagonal or the context's end
    (masked); otherwise every query of the block sees every key of the tile (no masks at all)."""
    if CAUSAL:
        k = tl.load(k_ptr + rows_k[:, None] * stride_km + h * stride_kh + offs_dn[None, :],
                    mask=mask_n[:, None] & (offs_dn[None, :] < N), other=0.0)
        kpe = tl.load(kpe_ptr + rows_k[:, None] * stride_em + h * stride_eh + offs_dr[None, :],
                      mask=mask_n[:, None] & (offs_dr[None, :] < R), other=0.0)
        v = tl.load(v_ptr + rows_k[:, None] * stride_vm + h * stride_vh + offs_dv[None, :],
                    mask=mask_n[:, None] & (offs_dv[None, :] < V), other=0.0)
    else:
        k = tl.load(k_ptr + rows_k[:, None] * stride_km + h * stride_kh + offs_dn[None, :],
                    mask=offs_dn[None, :] < N, other=0.0)
        kpe = tl.load(kpe_ptr + rows_k[:, None] * stride_em + h * stride_eh + offs_dr[None, :],
                      mask=offs_dr[None, :] < R, other=0.0)
        v = tl.load(v_ptr + rows_k[:, None] * stride_vm + h * stride_vh + offs_dv[None, :],
                    mask=offs_dv[None, :] < V, other=0.0)
    s = (dot(q, tl.trans(k), UPCAST) + dot(qpe, tl.trans(kpe), UPCAST)) * qk_scale
    if CAUSAL:
        s = tl.where(mask_n[None, :] & (offs_n[None, :] <= prefix + offs_m[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, UPCAST)
    return acc, m_new, l_i


@jit
def _prefill_attention_kernel(
    q_ptr, qpe_ptr, k_ptr, kpe_ptr, v_ptr, cu_q_ptr, cu_k_ptr, o_ptr,
    stride_qm, stride_qh, stride_pm, stride_ph, stride_km, stride_kh, stride_em, stride_eh,
    stride_vm, stride_vh, stride_om, stride_oh, H, qk_scale,
    N: tl.constexpr, R: tl.constexpr, V: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    # Blocks of the longest chunks first would balance better; the grid is (query blocks, chunks, heads).
    pid_m = tl.program_id(0)
    p = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + p)
    q_len = tl.load(cu_q_ptr + p + 1) - q_start
    m0 = pid_m * BLOCK_M
    if m0 < q_len:
        k_start = tl.load(cu_k_ptr + p)
        k_len = tl.load(cu_k_ptr + p + 1) - k_start
        prefix = k_len - q_len
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_dn = tl.arange(0, BLOCK_DN)
        offs_dr = tl.arange(0, BLOCK_DR)
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_m = offs_m < q_len
        rows_q = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows_q[:, None] * stride_qm + h * stride_qh + offs_dn[None, :],
                    mask=mask_m[:, None] & (offs_dn[None, :] < N), other=0.0)
        qpe = tl.load(qpe_ptr + rows_q[:, None] * stride_pm + h * stride_ph + offs_dr[None, :],
                      mask=mask_m[:, None] & (offs_dr[None, :] < R), other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        # Keys 0..prefix+m0 are visible to every query of the block (and inside the context): whole
        # tiles of them need no mask. The rest, up to the block's last query, are masked.
        full_end = ((prefix + m0 + 1) // BLOCK_N) * BLOCK_N
        end = tl.minimum(k_len, prefix + m0 + BLOCK_M)
        for n0 in range(0, full_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows_k = (k_start + offs_n).to(tl.int64)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, qpe, k_ptr, kpe_ptr, v_ptr, rows_k, offs_n < end, offs_m,
                                         offs_n, prefix, h, stride_km, stride_kh, stride_em, stride_eh, stride_vm,
                                         stride_vh, qk_scale, offs_dn, offs_dr, offs_dv, N, R, V, False, UPCAST)
        for n0 in range(full_end, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            rows_k = (k_start + offs_n).to(tl.int64)
            acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, qpe, k_ptr, kpe_ptr, v_ptr, rows_k, offs_n < end, offs_m,
                                         offs_n, prefix, h, stride_km, stride_kh, stride_em, stride_eh, stride_vm,
                                         stride_vh, qk_scale, offs_dn, offs_dr, offs_dv, N, R, V, True, UPCAST)
        # Every row of the block sees key 0, so l_i > 0 (rows past the chunk are not stored).
        out = acc / l_i[:, None]
        tl.store(o_ptr + rows_q[:, None] * stride_om + h * stride_oh + offs_dv[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_dv[None, :] < V))


def prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, max_q: int, softmax_scale: float,
                             *, block_m: int | None = None, block_n: int | None = None,
                             num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    T, H, N = q_nope.shape
    R, V = q_pe.shape[-1], v.shape[-1]
    assert k_nope.shape[1:] == (H, N) and v.shape[1] == H and k_pe.shape[-1] == R
    assert q_nope.dtype == q_pe.dtype == k_nope.dtype == k_pe.dtype == v.dtype, "one dtype for q, k and v"
    assert cu_q.dtype == cu_k.dtype == torch.int32
    for t in (q_nope, q_pe, k_nope, k_pe, v):
        assert t.stride(-1) == 1, "rows must be dense in their last dimension"
    shared_pe = k_pe.dim() == 2          # MLA: one rotated key per token for all heads
    stride_em, stride_eh = (k_pe.stride(0), 0) if shared_pe else (k_pe.stride(0), k_pe.stride(1))
    out = new_buffer((T, H, V), q_nope.dtype, q_nope.device)
    if T == 0:
        return out
    big = max(N, V) > 128 or q_nope.dtype == torch.float32
    block_m = block_m or (64 if big else 128)
    block_n = block_n or 64
    num_warps = num_warps or (4 if big else 8)
    num_stages = num_stages or (2 if big else 3)
    grid = (triton.cdiv(max_q, block_m), cu_q.numel() - 1, H)
    _prefill_attention_kernel[grid](
        q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, out,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), k_nope.stride(0), k_nope.stride(1),
        stride_em, stride_eh, v.stride(0), v.stride(1), out.stride(0), out.stride(1), H, softmax_scale * LOG2E,
        N=N, R=R, V=V, BLOCK_DN=triton.next_power_of_2(N), BLOCK_DR=triton.next_power_of_2(R),
        BLOCK_DV=triton.next_power_of_2(V), BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=INTERPRET,
        num_warps=num_warps, num_stages=num_stages)
    return out


def flash_supported(q_nope: torch.Tensor, q_pe: torch.Tensor, v: torch.Tensor) -> bool:
    """torch's flash-attention kernel takes these inputs: CUDA, sm80+, bf16/fp16, head size <= 256."""
    D = q_nope.shape[-1] + q_pe.shape[-1]
    return (q_nope.is_cuda and q_nope.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and D <= 256
            and v.shape[-1] <= D and torch.cuda.get_device_capability(q_nope.device)[0] >= 8
            and torch.backends.cuda.flash_sdp_enabled())


def prefill_attention_flash(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, max_q: int, max_k: int,
                            softmax_scale: float) -> torch.Tensor:
    """The same attention through torch's varlen flash-attention kernel (one launch for every chunk).

    Its causal mask is aligned to the bottom right when a chunk has fewer queries than keys, which is
    exactly "full over the cached prefix, causal inside the chunk". It wants one head size for q, k and
    v: the rope parts are concatenated (the shared k_pe broadcast over heads) and v is zero-padded to
    N + R, the padded output columns dropped. On an H200 at 32K tokens torch's flash kernel ran 3x the
    Triton kernel's FLOP rate (benchmarks/results/prefill.md), so it is the default where it applies.
    """
    T, H, N = q_nope.shape
    S, R, V = k_nope.shape[0], q_pe.shape[-1], v.shape[-1]
    q = torch.cat([q_nope, q_pe], dim=-1)
    k = torch.cat([k_nope, k_pe[:, None, :].expand(S, H, R) if k_pe.dim() == 2 else k_pe], dim=-1)
    if V < N + R:
        v = torch.nn.functional.pad(v, (0, N + R - V))
    out = torch.ops.aten._flash_attention_forward(q, k, v.contiguous(), cu_q, cu_k, max_q, max_k, 0.0, True,
                                                  False, scale=softmax_scale)[0]
    return out[..., :V].contiguous()


def cudnn_supported(q_nope: torch.Tensor, q_pe: torch.Tensor, v: torch.Tensor) -> bool:
    """cuDNN's fused attention takes these inputs: CUDA sm90+ (where it outruns the flash kernel), bf16/fp16,
    head sizes multiples of 8 up to 256 (q/k and v may differ: no padding)."""
    D, V = q_nope.shape[-1] + q_pe.shape[-1], v.shape[-1]
    return (q_nope.is_cuda and q_nope.dtype in (torch.float16, torch.bfloat16) and D % 8 == 0 and V % 8 == 0
            and D <= 256 and V <= 256 and torch.backends.cudnn.is_available()
            and torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(q_nope.device)[0] >= 9)


def merge_attention_parts(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over keys A and over keys B -> attention over A and B together: each part's output
    [..., T, V] weighted by its share of the softmax mass (log-sum-exps [..., T]); fp32 arithmetic."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - m).exp(), (lse2 - m).exp()
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(o1.dtype)


def prefill_attention_cudnn(q_nope, q_pe, k_nope, k_pe, v, softmax_scale: float) -> torch.Tensor:
    """One chunk (its T queries after S - T cached keys) through cuDNN's fused attention.

    Its causal mask is aligned to the top left, right for the chunk over itself but not over a prefix,
    so a chunk after a prefix takes two calls, over the prefix (no mask) and over itself (causal), merged
    by their log-sum-exps. Unlike the flash kernel it takes v at its own head size. On an H200, torch's
    attention through it ran 647 TFLOP/s on a 32K causal prompt against 314 for the masked long-prefix
    case (benchmarks/results/prefill.md); in the engine it took a 128K prompt's prefill from 10.8 to
    5.7 s (benchmarks/results/e2e.md): long prompts, one chunk per step, go here.
    """
    T, H, _ = q_nope.shape
    S, R = k_nope.shape[0], q_pe.shape[-1]
    q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)[None]                                  # [1, H, T, D]
    k = torch.cat([k_nope, k_pe[:, None, :].expand(S, H, R) if k_pe.dim() == 2 else k_pe], dim=-1)
    k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]                                       # [1, H, S, *]
    prefix = S - T

    def part(keys, values, causal):
        # Log-sum-exps always: cuDNN generates (compiles) a kernel per variant on first use, and with one
        # variant per mask the engine's start-up (a chunk after a 1-token prefix) compiles both.
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, keys, values, None, True, 0.0, causal, False, scale=softmax_scale)[:2]
        return out, lse

    out, lse = part(k[:, :, prefix:], v[:, :, prefix:], True)
    if prefix > 0:
        o1, l1 = part(k[:, :, :prefix], v[:, :, :prefix], False)
        out = merge_attention_parts(o1, l1.reshape(1, H, T), out, lse.reshape(1, H, T))
    return out[0].transpose(0, 1).contiguous()


def prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                      v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                      softmax_scale: float, max_k: int | None = None, **tuning) -> torch.Tensor:
    """All prefill chunks of a step: q_nope [T, H, N], q_pe [T, H, R], k_nope [S, H, N], k_pe [S, R]
    (shared by the heads) or [S, H, R], v [S, H, V]; chunk p's queries are rows cu_q[p]:cu_q[p+1],
    its keys (cached prefix, then the chunk itself) rows cu_k[p]:cu_k[p+1] -> [T, H, V].

    `max_q` / `max_k` (the longest chunk and context, host ints) size the launch. On CUDA in bf16/fp16
    a step of one chunk (a long prompt) goes through cuDNN's fused attention where it runs (sm90+), any
    other step through torch's varlen flash attention; otherwise the Triton kernel on CUDA (CPU under
    TRITON_INTERPRET=1) and the torch reference elsewhere; fp32 accumulation everywhere. Tuning
    arguments select the Triton kernel.
    """
    if q_nope.shape[0] == 0:
        return q_nope.new_empty(0, q_nope.shape[1], v.shape[-1])
    one_chunk = max_k is not None and q_nope.shape[0] == max_q and k_nope.shape[0] == max_k
    if not tuning and one_chunk and cudnn_supported(q_nope, q_pe, v):
        return prefill_attention_cudnn(q_nope, q_pe, k_nope, k_pe, v, softmax_scale)
    if not tuning and flash_supported(q_nope, q_pe, v):
        if max_k is None:
            max_k = int((cu_k[1:] - cu_k[:-1]).max())
        return prefill_attention_flash(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, max_q, max_k, softmax_scale)
    if use_triton(q_nope) and min(q_nope.shape[-1], q_pe.shape[-1], v.shape[-1]) >= 16:
        return prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, max_q, softmax_scale, **tuning)
    return prefill_attention_ref(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, softmax_scale)
