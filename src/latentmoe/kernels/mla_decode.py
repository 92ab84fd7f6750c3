"""MLA decode attention over the paged latent cache (Triton): split-KV partials, then a log-sum-exp merge.

Absorbed decode is an MQA: every head of a sequence attends to the same rows [c_kv (C) | k_pe (R)],
so one program takes BLOCK_H heads and loads each latent tile once for all of them. A sequence is
cut into at most NUM_SPLITS equal pieces, one program per piece, so that small batches still fill the chip;
each piece leaves its normalised output and log-sum-exp, and a second kernel merges them.

The piece count is fixed when a decode graph is captured (for the longest context it serves), but pieces
are whole BLOCK_N tiles, so a short sequence uses only the first few: the others write nothing and the
merge reads only the pieces in use (`split_range`). A graph sized for 128K contexts then costs a 1K
context no more than one sized for 1K.
"""
import torch

from ._triton import INTERPRET, dot, jit, new_buffer, pdl_launch, sm_count, tl, triton, use_triton, wait_for_inputs
from .reference import mla_decode_ref

LOG2E = 1.4426950408889634
# The queries' scale in the FP8 cache's fp16 dots (a power of two: exact), so that none overflows fp16 below 2^24.
Q16_SCALE = 1.0 / 256.0


@jit
def split_range(seq_lens_ptr, b, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens [start, end) of sequence b that piece `split` of NUM_SPLITS walks, and how many pieces the
    sequence uses: equal pieces rounded up to whole BLOCK_N tiles, so a sequence shorter than NUM_SPLITS
    tiles leaves the last pieces empty (shared by the latent and per-head decode kernels and the merge)."""
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N), 1) * BLOCK_N
    start = split * split_len
    return start, tl.minimum(start + split_len, seq_len), tl.cdiv(seq_len, split_len)


@jit
def past_the_end(start, end, split):
    """Whether piece `split` lies past its sequence's end: such a piece writes nothing and the merge does not
    read it, so its program exits at once (piece 0 always runs: an empty sequence's output is 0)."""
    return (start >= end) & (split > 0)


@jit
def _lookup(block_table_ptr, b, stride_bt, n0, end, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block of each token of the tile starting at n0 (0 past the sequence's end)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return tl.load(block_table_ptr + b * stride_bt + offs_n // PAGE, mask=offs_n < end, other=0)


@jit
def _mla_decode_split_kernel(
    q_lat_ptr, q_pe_ptr, kv_ptr, kv_scale_ptr, block_table_ptr, seq_lens_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_kv_blk, stride_kv_tok, stride_s_blk, stride_s_tok, stride_bt,
    stride_ob, stride_oh, stride_os,
    H, qk_scale, q16_scale,
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    # Head groups vary fastest, so the programs sharing one (sequence, split) run side by side
    # and all but the first find its latent tiles in L2.
    pid_h = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)

    start, end, _ = split_range(seq_lens_ptr, b, split, NUM_SPLITS, BLOCK_N)
    if past_the_end(start, end, split):
        return

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < H
    mask_c = offs_c < C
    mask_r = offs_r < R
    q_lat = tl.load(q_lat_ptr + b * stride_qb + offs_h[:, None] * stride_qh + offs_c[None, :],
                    mask=mask_h[:, None] & mask_c[None, :], other=0.0)          # [BLOCK_H, BLOCK_C]
    q_pe = tl.load(q_pe_ptr + b * stride_pb + offs_h[:, None] * stride_ph + offs_r[None, :],
                   mask=mask_h[:, None] & mask_r[None, :], other=0.0)           # [BLOCK_H, BLOCK_R]
    if KV_FP8:
        # The FP8 cache's dots run in fp16: e4m3 -> fp16 is one exact conversion instruction per two values
        # (to bf16 it takes three), and fp16 holds the bf16 queries exactly within its range. The queries
        # are scaled by q16_scale on the way (qk_scale undoes it). The scale is an argument, not a constant:
        # compiled for sm90 with a constant 2^-8, bf16 -> fp32 -> x 2^-8 -> fp16 rounded to fp16 before the
        # product (queries of 1e5 came out inf), which a runtime factor rules out.
        q_lat = (q_lat.to(tl.float32) * q16_scale).to(tl.float16)
        q_pe = (q_pe.to(tl.float32) * q16_scale).to(tl.float16)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)                 # running sum of exp2
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    # Token t of the sequence lives in cache block block_table[b, t // PAGE], row t % PAGE. The next tile's
    # blocks are looked up one iteration ahead: looked up inside the iteration, the lookup took a pipeline
    # stage of its own (compiled for sm90, the latent tile then had one buffer up to 4 stages); ahead, 3
    # stages double-buffer it and 4 triple-buffer it.
    page = _lookup(block_table_ptr, b, stride_bt, start, end, PAGE, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk = page.to(tl.int64)
        row = blk * stride_kv_blk + (offs_n % PAGE) * stride_kv_tok
        page = _lookup(block_table_ptr, b, stride_bt, n0 + BLOCK_N, end, PAGE, BLOCK_N)
        k_lat = tl.load(kv_ptr + row[:, None] + offs_c[None, :],
                        mask=mask_n[:, None] & mask_c[None, :], other=0.0)      # [BLOCK_N, BLOCK_C]
        k_pe = tl.load(kv_ptr + row[:, None] + C + offs_r[None, :],
                       mask=mask_n[:, None] & mask_r[None, :], other=0.0)       # [BLOCK_N, BLOCK_R]
        if KV_FP8:
            # e4m3 rows with a scale per token for each part. e4m3 values are exact in fp16, so the tiles are
            # only converted; each row's scale multiplies its score column (and its probability for the
            # values) instead: BLOCK_N x BLOCK_H products, not BLOCK_N x (C + R). Compiled for sm90 the e4m3
            # tile's load is not pipelined (the conversion sits between it and the dots), so this path is
            # slower per token than the bf16 cache's despite reading half the bytes; see mla_decode_triton
            # for the tiles that recover most of it. With bf16 dots two other loads measured slower on an
            # H200: prefetching the next tile into registers by hand (B=1 at 128K: 196 us), and a second load
            # of the tile for the values' dot (pipelined then): 128 us against 111 at B=4 and 32K. Nor do TMA
            # boxes help (one 64-row cache page a tile, the latent as two 256-column halves): H100, 2 stages
            # (3 exceed shared memory), B=256 at 1K 182 us against 151, B=4 at 32K 99 against 84, B=1 at 128K
            # 99 against 84 (the bf16 cache 110 / 67 / 67).
            srow = blk * stride_s_blk + (offs_n % PAGE) * stride_s_tok
            s_lat = tl.load(kv_scale_ptr + srow, mask=mask_n, other=0.0)
            s_pe = tl.load(kv_scale_ptr + srow + 1, mask=mask_n, other=0.0)
            k_lat = k_lat.to(tl.float16)
            k_pe = k_pe.to(tl.float16)
            s = dot(q_lat, tl.trans(k_lat), UPCAST) * s_lat[None, :] + dot(q_pe, tl.trans(k_pe), UPCAST) * s_pe[None, :]
        else:
            s = dot(q_lat, tl.trans(k_lat), UPCAST) + dot(q_pe, tl.trans(k_pe), UPCAST)  # fp32 [BLOCK_H, BLOCK_N]
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8:
            acc = acc * alpha[:, None] + dot((p * s_lat[None, :]).to(k_lat.dtype), k_lat, UPCAST)
        else:
            acc = acc * alpha[:, None] + dot(p.to(k_lat.dtype), k_lat, UPCAST)
        m_i = m_new

    # An empty sequence's only piece leaves o = 0.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + b * stride_ob + offs_h[:, None] * stride_oh + split * stride_os + offs_c[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_c[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + (b * H + offs_h) * NUM_SPLITS + split, lse, mask=mask_h)


@jit
def _mla_decode_merge_kernel(
    o_part_ptr, lse_ptr, seq_lens_ptr, out_ptr, stride_ob, stride_oh, H,
    C: tl.constexpr, BLOCK_C: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK_S: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_inputs(PDL)
    pid = tl.program_id(0)  # = b * H + h; o_part is [B, H, NUM_SPLITS, C] contiguous
    b = pid // H
    h = pid % H
    _, _, n_used = split_range(seq_lens_ptr, b, 0, NUM_SPLITS, BLOCK_N)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)   # this program's columns
    mask_c = offs_c < C
    lse = tl.load(lse_ptr + pid * NUM_SPLITS + offs_s, mask=offs_s < n_used, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse - m), 0)                    # empty pieces weigh 0
    # The pieces in use only, CHUNK_S at a time (one chunk up to 128 pieces).
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    offs_k = tl.arange(0, CHUNK_S)
    for s0 in range(0, n_used, CHUNK_S):
        mask_k = s0 + offs_k < n_used
        w = tl.exp2(tl.load(lse_ptr + pid * NUM_SPLITS + s0 + offs_k, mask=mask_k, other=float("-inf")) - m)
        o = tl.load(o_part_ptr + (pid * NUM_SPLITS + s0 + offs_k[:, None]) * C + offs_c[None, :],
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    out = acc / tl.maximum(total, 1e-30)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_c, out.to(out_ptr.dtype.element_ty), mask=mask_c)


def split_outputs(out: torch.Tensor, num_splits: int):
    """Where a split-KV decode kernel writes its pieces: straight into `out` [B, H, X] when there is one
    (the kernel normalises it itself), else fp32 partials [B, H, S, X] and log-sum-exps [B, H, S] for
    `merge_splits`. -> (o_part, lse, the three strides of o_part's batch, head and split dims)."""
    if num_splits == 1:
        return out, out, (out.stride(0), out.stride(1), 0)
    B, H, X = out.shape
    o_part = new_buffer((B, H, num_splits, X), torch.float32, out.device)
    lse = new_buffer((B, H, num_splits), torch.float32, out.device)
    return o_part, lse, o_part.stride()[:3]


def merge_splits(o_part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, seq_lens: torch.Tensor,
                 block_n: int, block_x: int | None = None) -> None:
    """out[b, h] = the log-sum-exp weighted mean of the partials o_part [B, H, S, X] (lse [B, H, S], log2
    units) of the pieces sequence b uses (`split_range` with the split kernel's `block_n`); shared by the
    latent and the per-head decode kernels."""
    B, H, num_splits, X = o_part.shape
    if block_x is None:
        # Columns in blocks of 32 where the rows are few: at batch 1 and 128 pieces, 64 programs of 128
        # columns looping over 32 pieces at a time finished 11 us after the split kernel on an H200 (a
        # dependent chain of loads per program). Wider blocks where the rows alone give every multiprocessor
        # four programs: 32-column programs for 200 sequences of 16 heads are 51,200 tiny programs. With the
        # same pieces, split + merge at B=64 and 1K (4 pieces) took 38 us, 57 with 32 columns; B=128 at 2K
        # (2 pieces) 100 us, 138 (H200, launches sized for 128K).
        block_x, enough = 32, 4 * sm_count(out.device)
        while block_x < X and B * H * triton.cdiv(X, 2 * block_x) >= enough:
            block_x *= 2
    block_x = min(block_x, triton.next_power_of_2(X))
    block_s = triton.next_power_of_2(num_splits)
    # Up to 128 pieces in one load, at most 8K partial values in registers at once.
    chunk_s = max(1, min(128, block_s, 8192 // block_x))
    _mla_decode_merge_kernel[(B * H, triton.cdiv(X, block_x))](
        o_part, lse, seq_lens, out, out.stride(0), out.stride(1), H,
        C=X, BLOCK_C=block_x, NUM_SPLITS=num_splits, BLOCK_S=block_s, BLOCK_N=block_n,
        CHUNK_S=chunk_s, num_warps=4, **pdl_launch(out))


# The cache rows `choose_num_splits`' saturating_per_sm was measured with: bf16, 512 latent + 64 RoPE columns.
MEASURED_ROW_BYTES = (512 + 64) * 2


def choose_num_splits(batch: int, head_groups: int, max_seq_len: int, device: torch.device, ctas_per_sm: int = 2,
                      min_tokens_per_split: int = 32, max_splits: int = 128, piece_overhead: int = 64,
                      row_bytes: int = MEASURED_ROW_BYTES, saturating_per_sm: float = 1.4, merge_overhead: int = 100,
                      partial_bytes: int = 16 * 512 * 4 * 2) -> int:
    """Pieces per sequence, from a model of the launch in units of the time one program takes per token.

    With s pieces the grid has batch * head_groups * s programs, run in ceil(programs / slots) waves
    (slots = ctas_per_sm per multiprocessor); each program walks max_seq_len / s tokens plus a fixed
    cost (query load, partial write) worth about `piece_overhead` tokens. A program's walk is a chain of
    dependent DRAM round trips, so programs add up until `saturating_per_sm` of them per multiprocessor
    reach the memory bandwidth (for rows of `row_bytes`; fewer bytes a row, more programs): no
    launch is faster than batch * head_groups * max_seq_len tokens over that many programs. More than one
    piece adds the merge: a launch (`merge_overhead`) and the partials (`partial_bytes` a program, written
    and read again) at that bandwidth. Minimise the total, fewest pieces on ties.

    Measured on an H200 (16 heads, launches sized for 128K contexts): one program walks a token in about
    53 ns, and 200 sequences of 1,050 tokens in one piece each took 96 us, near the bandwidth (hence 1.4
    programs a multiprocessor). Without the bandwidth bound the model gave those 200 sequences 64 pieces,
    33 of them used (310 us with the merge); with it, 1 (96 us). Below one wave the count fills the wave
    (on an H100 4 pieces of B=64 ran 1.4x faster than 5, whose second wave was nearly empty). Pieces stay
    at least `min_tokens_per_split` long (one 32-token tile).
    At most 128 pieces: at batch 1 and 128K context the kernel (4 stages) took 96.8 us with 64 pieces,
    62.6 us with 128 and 83.9 us with 256. A short context in a graph sized for 128K uses only the
    pieces it fills and the others exit at once (1K context: 9-11 us with 32 to 256 pieces).
    At batch 200 and 1,050 tokens (H100, graph replays) the chosen single piece, 95 us (2.5 TB/s), beat
    2 pieces (116 us), 4 (123), and with one piece 4 stages (130), 8 warps (117) and 64-token tiles (138).
    """
    programs = batch * head_groups
    sms = sm_count(device)
    slots = ctas_per_sm * sms
    # Bytes the memory moves in one token's time of one program, and the programs that reach it.
    bytes_per_token_time = saturating_per_sm * sms * MEASURED_ROW_BYTES
    floor = programs * max_seq_len * row_bytes / bytes_per_token_time
    cap = max(1, min(max_splits, max_seq_len // min_tokens_per_split))

    def cost(s: int) -> float:
        walk = max(-(-programs * s // slots) * (max_seq_len / s + piece_overhead), floor)
        merge = 0 if s == 1 else merge_overhead + programs * s * partial_bytes / bytes_per_token_time
        return walk + merge

    # Powers of two only: each count is a compiled variant, and seven of them can all be compiled at
    # start-up (engine warm-up), so no batch the engine forms later compiles anything.
    candidates = [1 << i for i in range(cap.bit_length()) if 1 << i <= cap]
    return min(candidates, key=lambda s: (cost(s), s))


def mla_decode_triton(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, softmax_scale: float, *, max_seq_len: int | None = None,
                      num_splits: int | None = None, block_h: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int | None = None,
                      out: torch.Tensor | None = None, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    B, H, C = q_lat.shape
    R = q_pe.shape[-1]
    NB, PAGE, X = kv_cache.shape
    assert X == C + R, f"kv_cache rows are {X} wide, expected C + R = {C + R}"
    assert kv_cache.stride(-1) == 1 and block_table.stride(-1) == 1, "cache rows and block-table rows must be dense"
    assert block_table.dtype == torch.int32 and seq_lens.dtype == torch.int32
    fp8 = kv_scale is not None
    assert q_lat.dtype == q_pe.dtype and (fp8 or kv_cache.dtype == q_lat.dtype), \
        "queries and cache must share one dtype"
    assert not fp8 or (kv_scale.shape == (NB, PAGE, 2) and kv_scale.stride(-1) == 1)
    q_lat = q_lat if q_lat.stride(-1) == 1 else q_lat.contiguous()
    q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
    seq_lens = seq_lens.contiguous()
    block_h = block_h or (16 if H <= 16 else 64)
    # The FP8 cache's 16-head programs take 64-token tiles and 8 warps: its conversions spread over twice the
    # threads and each (unpipelined) load fetches twice the rows. On an H200 (launches sized for 128K, 16
    # heads, fp16 dots): B=256 at 1K 151 us, B=64 at 1K 44, B=4 at 32K 86, B=1 at 128K 86; with 32 tokens
    # and 4 warps 158 / 51 / 88 / 134, and so with bf16 dots (the conversion before) 194 / 60 / 105 / 168.
    # The bf16 cache's kernel took 92 / 39 / 61 / 70 in the same run.
    wide = block_h > 16 or fp8   # 64-token tiles and 8 warps
    block_n = block_n or (64 if wide else 32)
    head_groups = triton.cdiv(H, block_h)
    # No host sync: the longest possible sequence comes from the block table's width unless given.
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * PAGE
    if num_warps is None:
        num_warps = 8 if wide else 4
    if num_splits is None:
        # Registers allow two 4-warp programs of 16 heads per multiprocessor, one of the 64-head kind.
        ctas = 2 if block_h <= 16 and num_warps == 4 else 1
        row_bytes = X * kv_cache.element_size() + (kv_scale.shape[-1] * kv_scale.element_size() if fp8 else 0)
        num_splits = choose_num_splits(B, head_groups, max_seq_len, q_lat.device, ctas, row_bytes=row_bytes,
                                       partial_bytes=min(H, block_h) * C * 4 * 2)
    if num_stages is None:
        # The next tile's cache blocks are looked up a tile ahead, so 3 stages double-buffer the latent tile and
        # 4 triple-buffer it (130 KB of shared memory: one program a multiprocessor). On an H200, one program
        # per multiprocessor (B=1, 128K context, 128 pieces) took 62.6 us with 4 stages and 85.6 with 3; with
        # more programs than multiprocessors two of 3 stages share one (B=4 at 32K: 59.2 us, 4 stages 65.1;
        # B=64 at 4K: 97.0 us with 3). 64-head programs have room for 2 stages only.
        # The FP8 cache's tile load is not pipelined (see the kernel), so its stages only hold shared memory. For
        # 16-head programs (64-head ones, not measured, keep 2) one stage measured fastest of 1-3 at every point
        # (H100, launches sized for 128K: B=256 at 1K 142.8 us against 153.2 as before, B=64 at 1K 43.1 / 44.6,
        # B=4 at 32K 79.8 / 83.6, B=1 at 128K 80.2 / 83.2; the bf16 cache 114.1 / 42.4 / 68.5 / 65.4), and in
        # whole decode steps of an engine with FP8 weights and cache (H100, 1K context, engines alternating in one
        # process, two rounds): B=1 2.33-2.34 against 2.38 ms, B=64 10.11-10.15 against 10.21-10.23, B=256
        # 13.14-13.16 against 13.41.
        one_wave = B * head_groups * num_splits <= sm_count(q_lat.device)
        num_stages = (1 if fp8 else 4 if one_wave else 3) if block_h <= 16 else 2
    if out is None:
        out = new_buffer(q_lat.shape, q_lat.dtype, q_lat.device)
    assert out.shape == q_lat.shape and out.stride(-1) == 1
    o_part, lse, so = split_outputs(out, num_splits)
    _mla_decode_split_kernel[(head_groups, num_splits, B)](
        q_lat, q_pe, kv_cache, kv_scale if fp8 else kv_cache, block_table, seq_lens, o_part, lse,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_scale.stride(0) if fp8 else 0, kv_scale.stride(1) if fp8 else 0,
        block_table.stride(0), *so,
        H, softmax_scale * LOG2E / (Q16_SCALE if fp8 else 1.0), Q16_SCALE,
        C=C, R=R, BLOCK_C=triton.next_power_of_2(C), BLOCK_R=triton.next_power_of_2(R),
        PAGE=PAGE, BLOCK_H=block_h, BLOCK_N=block_n, NUM_SPLITS=num_splits, UPCAST=INTERPRET, KV_FP8=fp8,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(q_lat))
    if num_splits > 1:
        merge_splits(o_part, lse, out, seq_lens, block_n)
    return out


def mla_decode(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, softmax_scale: float, kv_scale: torch.Tensor | None = None,
               **tuning) -> torch.Tensor:
    """Absorbed decode attention: q_lat [B,H,C], q_pe [B,H,R], kv_cache [NB,BS,C+R] -> o_lat [B,H,C].

    Triton on CUDA (and on CPU under TRITON_INTERPRET=1), the torch reference elsewhere. fp32
    accumulation (fp32 inputs multiply as tf32 on a GPU); the result has q_lat's dtype. `tuning`
    (max_seq_len, num_splits, block_h, block_n, num_warps, num_stages, out) reaches the Triton
    path only; max_seq_len (an upper bound, default the block table's capacity) picks the split count
    without a host sync. An FP8 cache (e4m3 rows) comes with `kv_scale` [NB,BS,2] (kernels/fp8_cache.py).
    """
    # tl.dot on a GPU needs inner dims of at least 16: narrower latents/rope keys take the reference.
    if use_triton(q_lat) and min(q_lat.shape[-1], q_pe.shape[-1]) >= 16:
        return mla_decode_triton(q_lat, q_pe, kv_cache, block_table, seq_lens, softmax_scale, kv_scale=kv_scale,
                                 **tuning)
    return mla_decode_ref(q_lat, q_pe, kv_cache, block_table, seq_lens, softmax_scale, kv_scale)
