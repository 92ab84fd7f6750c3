"""Batched prefill attention (Triton): every prompt chunk of a step in one launch, variable lengths.

Chunk p has q_len new queries and k_len keys: its cached prefix (k_len - q_len tokens) followed by
itself. Query i of the chunk sits at position prefix + i and sees keys 0..prefix + i: full over the
prefix, causal inside the chunk. No mask is ever materialised; the lengths arrive as cumulative
offsets (cu_q, cu_k), so one call serves any mix of chunks.

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


def joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """[..., A] and [..., B] as one [..., A + B] view when b's columns directly follow a's in every row (as
    q_nope and q_pe do, split from one projection and rotated in place): no copy. None otherwise."""
    if (a.shape[:-1] != b.shape[:-1] or a.stride() != b.stride() or a.dtype != b.dtype or a.device != b.device
            or a.stride(-1) != 1 or b.data_ptr() != a.data_ptr() + a.shape[-1] * a.element_size()):
        return None
    n = a.shape[-1] + b.shape[-1]
    if a.dim() > 1 and a.shape[-2] > 1 and a.stride(-2) < n:
        return None
    return a.as_strided((*a.shape[:-1], n), a.stride())


def concat_heads_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[S, H, A] with [S, H, B] or (shared by the heads) [S, B] -> [S, H, A + B] = [a | b]."""
    S, H, A = a.shape
    return torch.cat([a, b[:, None, :].expand(S, H, b.shape[-1]) if b.dim() == 2 else b], dim=-1)


@jit
def _concat_heads_kernel(a_ptr, b_ptr, o_ptr, H, stride_as, stride_ah, stride_bs, stride_bh, stride_os, stride_oh,
                         A: tl.constexpr, B: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mh = offs_h[:, None] < H
    offs_a = tl.arange(0, BLOCK_A)
    ma = mh & (offs_a[None, :] < A)
    x = tl.load(a_ptr + s * stride_as + offs_h[:, None] * stride_ah + offs_a[None, :], mask=ma, other=0.0)
    tl.store(o_ptr + s * stride_os + offs_h[:, None] * stride_oh + offs_a[None, :], x, mask=ma)
    offs_b = tl.arange(0, BLOCK_B)
    mb = mh & (offs_b[None, :] < B)
    y = tl.load(b_ptr + s * stride_bs + offs_h[:, None] * stride_bh + offs_b[None, :], mask=mb, other=0.0)
    tl.store(o_ptr + s * stride_os + offs_h[:, None] * stride_oh + A + offs_b[None, :], y, mask=mb)


def concat_heads(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """concat_heads_ref in one pass: the keys' [k_nope | k_pe] (k_pe broadcast over the heads, read once
    per token) for cuDNN's attention, which wants whole heads. On an H200 in a 32K prefill, torch.cat's q
    and k concatenations took 4% of the kernel time at about 0.7 TB/s; this kernel builds the keys at about
    2.7 TB/s (3.4 ms in all, q needs no copy at all: see `joined`). Triton where it runs, the reference
    elsewhere."""
    S, H, A = a.shape
    B = b.shape[-1]
    if not use_triton(a) or a.stride(-1) != 1 or b.stride(-1) != 1:
        return concat_heads_ref(a, b)
    out = new_buffer((S, H, A + B), a.dtype, a.device)
    if S:
        bs, bh = (b.stride(0), 0) if b.dim() == 2 else (b.stride(0), b.stride(1))
        block_h = min(16, triton.next_power_of_2(H))
        _concat_heads_kernel[(S, triton.cdiv(H, block_h))](
            a, b, out, H, a.stride(0), a.stride(1), bs, bh, out.stride(0), out.stride(1), A=A, B=B,
            BLOCK_H=block_h, BLOCK_A=triton.next_power_of_2(A), BLOCK_B=triton.next_power_of_2(B), num_warps=4)
    return out


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
    # Grid (query blocks, chunks, heads). Launching the heaviest causal blocks first (grid reversed, block
    # index counted down) measured slower on an H100 (V2-Lite heads, graph replays): 16 x 1,000 tokens 296 ->
    # 319 us, 25 of 256-1,024 201 -> 210, 4 x 4,096 846 -> 1,009; faster only for 2 x 8,000 (1,550 -> 1,498)
    # and 2 x 2,048 after 6,000 cached (710 -> 690); 200 x (1,000/100) in the engine unchanged (3.36-3.41 s).
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
    # Tiles: a sweep of 36 (H100, V2-Lite heads, bf16) kept 128 x 64 with 8 warps and 3 stages best or within
    # 1% at 16 x 1,000 tokens (301 us, 272 TFLOP/s) and 2 x 8,000 (1,455 us, 450 TFLOP/s); at 25 chunks of
    # 256-1,024 the `big` tiles were 6% faster (256 against 271 us). `benchmarks/bench_prefill.py --sweep`.
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


def cudnn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """cuDNN's fused attention runs here: CUDA sm90+, bf16/fp16, enabled in torch."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and torch.backends.cudnn.is_available()
            and torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(device)[0] >= 9)


def cudnn_supported(q_nope: torch.Tensor, q_pe: torch.Tensor, v: torch.Tensor) -> bool:
    """cuDNN's fused attention takes these inputs: cudnn_usable, head sizes multiples of 8 up to 256
    (q/k and v may differ: no padding)."""
    D, V = q_nope.shape[-1] + q_pe.shape[-1], v.shape[-1]
    return D % 8 == 0 and V % 8 == 0 and D <= 256 and V <= 256 and cudnn_usable(q_nope.device, q_nope.dtype)


# cuDNN builds an execution plan for every new sequence length it meets (torch keeps them by shape), and a
# new one-chunk length paid it on its first call while serving: on an H100 (V2-Lite, warm engine) a prompt
# of 5,000 tokens took 177 ms the first time against 57 ms after, 40,003 tokens 782 against 711. So the
# chunk is padded at its end to a length of this ladder (at most 1/CUDNN_PER_OCTAVE padding), and start-up
# runs every ladder length up to its token budget (cudnn_lengths). The attention alone (bench_prefill.py,
# H100): a new 5,000-token length padded to a ladder length run before took 1.3 ms on its first call,
# against 60.3 ms unpadded (0.5 ms on repeats); identical outputs.
CUDNN_PER_OCTAVE = 16


def cudnn_length(length: int) -> int:
    """`length` rounded up to the ladder of CUDNN_PER_OCTAVE lengths per octave."""
    step = max(1, (1 << (length.bit_length() - 1)) // CUDNN_PER_OCTAVE)
    return -(-length // step) * step


def cudnn_lengths(max_tokens: int, device: torch.device, dtype: torch.dtype) -> list[int]:
    """Token counts of one-chunk steps, none over `max_tokens`, that together give cuDNN every padded length a
    step of up to `max_tokens` tokens can (the ladder's lengths, the last one cut to `max_tokens`, which pads to
    it); none where cuDNN's attention does not run. What start-up runs so that no length plans while serving."""
    if max_tokens < CUDNN_MIN_CHUNK or not cudnn_usable(device, dtype):
        return []
    lengths, n = [], cudnn_length(CUDNN_MIN_CHUNK)
    while n <= cudnn_length(max_tokens):
        lengths.append(min(n, max_tokens))
        n = cudnn_length(n + 1)
    return lengths


def merge_attention_parts_ref(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over keys A and over keys B -> attention over A and B together: each part's output
    [H, T, V] weighted by its share of the softmax mass (log-sum-exps [H, T]); fp32 arithmetic -> [T, H, V]."""
    m = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - m).exp(), (lse2 - m).exp()
    out = (o1.float() * w1[..., None] + o2.float() * w2[..., None]) / (w1 + w2)[..., None]
    return out.to(o1.dtype).transpose(0, 1).contiguous()


@jit(do_not_specialize=["T", "sl1h", "sl2h"])   # the log-sum-exps' head stride is T too
def _merge_parts_kernel(o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, T, V, s1h, s1t, s2h, s2t, sl1h, sl2h, soh, sot,
                        BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1).to(tl.int64)
    offs_v = tl.arange(0, BLOCK_V)
    mt = offs_t < T
    mask = mt[:, None] & (offs_v[None, :] < V)
    l1 = tl.load(l1_ptr + h * sl1h + offs_t, mask=mt, other=0.0)
    l2 = tl.load(l2_ptr + h * sl2h + offs_t, mask=mt, other=0.0)
    m = tl.maximum(l1, l2)
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    rows = offs_t[:, None].to(tl.int64)
    o1 = tl.load(o1_ptr + h * s1h + rows * s1t + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(o2_ptr + h * s2h + rows * s2t + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
    out = (o1 * w1[:, None] + o2 * w2[:, None]) / (w1 + w2)[:, None]
    tl.store(out_ptr + h * soh + rows * sot + offs_v[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def merge_attention_parts(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """merge_attention_parts_ref in one kernel (torch runs about a dozen, half of them fp32 passes over the parts),
    writing the [T, H, V] rows the output projection reads. Triton where it runs, the reference elsewhere."""
    H, T, V = o1.shape
    l1, l2 = lse1.float(), lse2.float()
    if not use_triton(o1) or o1.stride(-1) != 1 or o2.stride(-1) != 1 or l1.stride(-1) != 1 or l2.stride(-1) != 1:
        return merge_attention_parts_ref(o1, lse1, o2, lse2)
    out = new_buffer((T, H, V), o1.dtype, o1.device)
    if T:
        block_t = 32
        _merge_parts_kernel[(triton.cdiv(T, block_t), H)](
            o1, l1, o2, l2, out, T, V, o1.stride(0), o1.stride(1), o2.stride(0), o2.stride(1),
            l1.stride(0), l2.stride(0), out.stride(1), out.stride(0), BLOCK_T=block_t,
            BLOCK_V=triton.next_power_of_2(V), num_warps=4)
    return out


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """cuDNN's fused attention on [1, H, rows, *] tensors (causal: aligned to the top left) -> (out [1, H, Tq, V],
    log-sum-exps, H x Tq values). Log-sum-exps always: cuDNN generates (compiles) a kernel per variant on first
    use, and with one variant per mask the engine's start-up (a chunk after a 1-token prefix) compiles both."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]


def prefill_attention_cudnn(q_nope, q_pe, k_nope, k_pe, v, softmax_scale: float) -> torch.Tensor:
    """One chunk (its T queries after S - T cached keys) through cuDNN's fused attention.

    Its causal mask is aligned to the top left, right for the chunk over itself but not over a prefix,
    so a chunk after a prefix takes two calls, over the prefix (no mask) and over itself (causal), merged
    by their log-sum-exps. It takes v at its own head size. On an H200, torch's
    attention through it ran 647 TFLOP/s on a 32K causal prompt against 314 for the masked long-prefix
    case (benchmarks/results/prefill.md); in the engine it took a 128K prompt's prefill from 10.8 to
    5.7 s (benchmarks/results/e2e.md): long prompts, one chunk per step, go here.

    The chunk runs padded at its end with zero rows to cudnn_length(T) queries (and, over itself, keys):
    under the causal mask no real query sees a padded key, and the padded queries' rows are dropped, so
    the result is the unpadded one while cuDNN meets only the ladder's lengths. The prefix's keys are not
    padded (the call over them has no mask): a chunk after a prefix of a length not met before still plans.
    """
    T, H, _ = q_nope.shape
    S = k_nope.shape[0]
    prefix = S - T
    Tp = cudnn_length(T)

    def padded(t):
        # [T, H, *] -> [Tp, H, *] with zero rows after, laid out with t's own strides: cuDNN meets one layout
        # per length whether or not a length needs padding. With contiguous padded copies of the projection's
        # strided views, a new 5,000-token prompt still took 142 ms the first time against 57 ms after (H100,
        # engine started for its ladder); laid out this way, 61 ms against 58 (new 20,001 / 60,007-token
        # prompts: no slower than their repeats; benchmarks/results/e2e.md).
        if Tp == T:
            return t
        out = torch.empty_strided((Tp, *t.shape[1:]), t.stride(), dtype=t.dtype, device=t.device)
        out[:T] = t
        out[T:].zero_()
        return out

    def heads_first(t):
        return t.transpose(0, 1)[None]                                                          # [1, H, rows, *]

    q = joined(q_nope, q_pe)      # the projection's own rows when q_pe follows q_nope (rotated in place)
    q = heads_first(padded(torch.cat([q_nope, q_pe], dim=-1) if q is None else q))
    k = concat_heads(k_nope, k_pe)

    def part(keys, values, causal):
        out, lse = cudnn_attention(q, heads_first(keys), heads_first(values), causal, softmax_scale)
        return out[0, :, :T], lse.reshape(H, Tp)[:, :T]

    out, lse = part(padded(k[prefix:]), padded(v[prefix:]), True)
    if prefix > 0:
        o1, l1 = part(k[:prefix], v[:prefix], False)
        return merge_attention_parts(o1, l1, out, lse)
    return out.transpose(0, 1).contiguous()


# One chunk from this many tokens goes to cuDNN. On an H200 (V2-Lite heads) cuDNN against the Triton kernel:
# 0.25 against 0.09 ms for 1,000 tokens (0.27 against 0.12 after 4,000 cached), even at 4,000, 2.3 against
# 3.0 ms at 16K, 15.7 against 21.1 ms for 16K after 48K cached.
CUDNN_MIN_CHUNK = 4096


def prefill_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                      v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
                      softmax_scale: float, max_k: int | None = None, **tuning) -> torch.Tensor:
    """All prefill chunks of a step: q_nope [T, H, N], q_pe [T, H, R], k_nope [S, H, N], k_pe [S, R]
    (shared by the heads) or [S, H, R], v [S, H, V]; chunk p's queries are rows cu_q[p]:cu_q[p+1],
    its keys (cached prefix, then the chunk itself) rows cu_k[p]:cu_k[p+1] -> [T, H, V].

    `max_q` / `max_k` (the longest chunk and context, host ints) size the launch. On CUDA in bf16/fp16
    a step of one chunk of at least CUDNN_MIN_CHUNK tokens (a long prompt) goes through cuDNN's fused
    attention where it runs (sm90+), any other step through the Triton kernel (also on CPU under
    TRITON_INTERPRET=1), the torch reference elsewhere; fp32 accumulation everywhere. Tuning arguments
    select the Triton kernel.

    Why not torch's varlen flash kernel for the steps of several chunks: it wants one head size, so the keys
    are concatenated, v padded from 128 to 192 and the output sliced (three copies and 20% more work); on
    an H200 (V2-Lite heads, 16K queries a step) the Triton kernel took 0.32 against 0.69 ms for 16 prompts of
    1,000 tokens, 0.21 against 0.46 for 25 of 256-1,024, 1.52 against 2.91 for two of 8,000 and 5.5 against
    10.4 for two chunks of 8,000 after 24,000 cached tokens, copies included. Nor cuDNN's ragged attention
    (torch's `_cudnn_attention_forward` with cumulative offsets, no prefix): right to 0.004, but 40-47 ms a
    call at every size tried on an H100 (16 x 1,000 tokens, 25 of 256-1,024, 2 x 8,000, 4 x 4,096; new shapes
    and repeats alike), against 0.25-1.5 ms for this kernel.
    """
    if q_nope.shape[0] == 0:
        return q_nope.new_empty(0, q_nope.shape[1], v.shape[-1])
    one_chunk = max_k is not None and q_nope.shape[0] == max_q and k_nope.shape[0] == max_k
    if not tuning and one_chunk and max_q >= CUDNN_MIN_CHUNK and cudnn_supported(q_nope, q_pe, v):
        return prefill_attention_cudnn(q_nope, q_pe, k_nope, k_pe, v, softmax_scale)
    if use_triton(q_nope) and min(q_nope.shape[-1], q_pe.shape[-1], v.shape[-1]) >= 16:
        return prefill_attention_triton(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, max_q, softmax_scale, **tuning)
    return prefill_attention_ref(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, softmax_scale)
