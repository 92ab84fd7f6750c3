"""Plain-PyTorch references for the kernels: the definitions the fast paths are tested against.

Shape legend: B batch (sequences), H heads, C latent width (kv_lora_rank), R rope width,
N nope width, NB/BS cache blocks / tokens per block, MB block-table width, M tokens, K experts per
token, E experts, D hidden, I expert width.

The norm, RoPE and routing references repeat the model's formulas in the same order (model.py is the
ground truth and stays free of kernel concerns); tests check both agree.
"""
import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or fp64 when the inputs are fp64 (tests' high-precision references)."""
    return torch.promote_types(t.dtype, torch.float32)


def _gather_pages(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Each sequence's cache rows in order: cache [NB, BS, ...] -> [B, MB*BS, ...]. Block-table entries
    past a sequence's length are never read (they may be junk); their rows are block 0's."""
    first_pos_MB = torch.arange(block_table.shape[1], device=block_table.device) * cache.shape[1]
    table_BM = torch.where(first_pos_MB[None, :] < seq_lens[:, None], block_table.long(), 0)
    return cache[table_BM].flatten(1, 2)


def _mask_past(scores_BHS: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    pos_S = torch.arange(scores_BHS.shape[-1], device=scores_BHS.device)
    return scores_BHS.masked_fill((pos_S[None, :] >= seq_lens[:, None])[:, None, :], float("-inf"))


def mla_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                   block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float,
                   kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Absorbed decode attention, one new token per sequence: an MQA with C+R wide keys, C wide values.

    score[b,h,s] = (q_lat[b,h] . c_kv[b,s] + q_pe[b,h] . k_pe[b,s]) * scale, softmax over the
    seq_lens[b] cached tokens, o[b,h] = sum_s p[b,h,s] c_kv[b,s]; all in fp32 (fp64 for fp64 inputs),
    the result in q_lat's dtype. An FP8 cache comes with kv_scale [NB, BS, 2] (c_kv's and k_pe's scale
    per token, kernels/fp8_cache.py): its rows are dequantised as they are gathered.
    """
    C = q_lat.shape[-1]
    acc = _acc(q_lat)
    rows_BSX = _gather_pages(kv_cache, block_table, seq_lens).to(acc)
    if kv_scale is not None:
        s_BS2 = _gather_pages(kv_scale, block_table, seq_lens).to(acc)
        rows_BSX = torch.cat([rows_BSX[..., :C] * s_BS2[..., :1], rows_BSX[..., C:] * s_BS2[..., 1:]], dim=-1)
    c_kv_BSC, k_pe_BSR = rows_BSX[..., :C], rows_BSX[..., C:]
    scores_BHS = (torch.einsum("bhc,bsc->bhs", q_lat.to(acc), c_kv_BSC)
                  + torch.einsum("bhr,bsr->bhs", q_pe.to(acc), k_pe_BSR)) * softmax_scale
    p_BHS = _mask_past(scores_BHS, seq_lens).softmax(dim=-1)
    return torch.einsum("bhs,bsc->bhc", p_BHS, c_kv_BSC).to(q_lat.dtype)


def mla_decode_einsum(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv_BSC: torch.Tensor, k_pe_BSR: torch.Tensor,
                      softmax_scale: float) -> torch.Tensor:
    """The batched plain-PyTorch absorbed attention over a dense (unpaged) latent cache: the speed baseline."""
    scores_BHS = (torch.einsum("bhc,bsc->bhs", q_lat, c_kv_BSC)
                  + torch.einsum("bhr,bsr->bhs", q_pe, k_pe_BSR)).float() * softmax_scale
    p_BHS = scores_BHS.softmax(dim=-1).to(c_kv_BSC.dtype)
    return torch.einsum("bhs,bsc->bhc", p_BHS, c_kv_BSC)


def mha_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Decode attention over a per-head paged K/V cache (the MHA baseline), one new token per sequence.

    q [B,H,Dk], k_cache [NB,BS,H,Dk], v_cache [NB,BS,H,Dv] -> o [B,H,Dv] in q's dtype; each sequence's
    blocks gathered from block_table [B,MB] (entries past a sequence's blocks are never read),
    positions >= seq_lens[b] masked, softmax in fp32 (fp64 for fp64 inputs).
    """
    acc = _acc(q)
    k_BSHD = _gather_pages(k_cache, block_table, seq_lens).to(acc)
    v_BSHD = _gather_pages(v_cache, block_table, seq_lens).to(acc)
    scores_BHS = torch.einsum("bhd,bshd->bhs", q.to(acc), k_BSHD) * softmax_scale
    return torch.einsum("bhs,bshd->bhd", _mask_past(scores_BHS, seq_lens).softmax(-1), v_BSHD).to(q.dtype)


def write_latent_cache_ref(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, c_kv: torch.Tensor,
                           k_pe: torch.Tensor) -> None:
    """kv_cache row `slot` (= block * BS + offset) <- [c_kv | k_pe]; negative slots are padding and skipped."""
    keep = slot_mapping >= 0
    rows_X = kv_cache.view(-1, kv_cache.shape[-1])
    rows_X[slot_mapping[keep]] = torch.cat([c_kv[keep], k_pe[keep]], dim=-1).to(kv_cache.dtype)


def fused_moe_ref(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor, round_h=None) -> torch.Tensor:
    """Routed experts, one expert at a time in fp32: y[m] = sum_k w[m,k] FFN_{idx[m,k]}(x[m]) (negative ids skipped).

    gate_up_proj [E, 2I, D] rows [gate | up], down_proj [E, D, I]; SwiGLU FFN(x) = down(silu(gate x) * up x).
    `round_h` (optional) maps the SwiGLU output before the down projection, as a kernel that stores it in a
    narrower format rounds it.
    """
    I = down_proj.shape[-1]
    acc = _acc(x_MD)
    y_MD = torch.zeros(x_MD.shape, dtype=acc, device=x_MD.device)
    for e in topk_idx_MK.unique().tolist():
        if e < 0:   # a skipped assignment (fused_moe's skip_negative)
            continue
        tok, slot = (topk_idx_MK == e).nonzero(as_tuple=True)
        h_T2I = x_MD[tok].to(acc) @ gate_up_proj[e].to(acc).T
        a_TI = F.silu(h_T2I[:, :I]) * h_T2I[:, I:]
        if round_h is not None:
            a_TI = round_h(a_TI).to(acc)
        y_MD.index_add_(0, tok, (a_TI @ down_proj[e].to(acc).T) * topk_weight_MK[tok, slot].to(acc)[:, None])
    return y_MD.to(x_MD.dtype)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)): statistics in fp32, rounded to x's dtype before the weight."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) in fp32; cos/sin broadcast to [..., R/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


def mla_post_projection_ref(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            cos: torch.Tensor, sin: torch.Tensor, n_heads: int):
    """MLA after its projections: q [M, H*(N+R)], kv [M, C+R], cos/sin [M, R/2] fp32
    -> q_nope [M,H,N], q_pe [M,H,R] (rotated), c_kv [M,C] (RMS-normed), k_pe [M,R] (rotated)."""
    M, R = q.shape[0], 2 * cos.shape[-1]
    q_MHX = q.view(M, n_heads, -1)
    q_nope, q_pe = q_MHX.split([q_MHX.shape[-1] - R, R], dim=-1)
    c_kv, k_pe = kv.split([kv.shape[-1] - R, R], dim=-1)
    return (q_nope, rope_ref(q_pe, cos[:, None], sin[:, None]), rms_norm_ref(c_kv, norm_weight, eps),
            rope_ref(k_pe, cos, sin))


def softmax_topk_ref(logits_ME: torch.Tensor, top_k: int, norm_topk_prob: bool, routed_scaling_factor: float):
    """Greedy routing from router logits: scores = softmax in fp32, the top_k experts, their weights
    normalised (top_k > 1 and norm_topk_prob) or else scaled -> scores [M,E], topk_weight [M,K], topk_idx [M,K]."""
    scores_ME = logits_ME.float().softmax(dim=-1)
    topk_weight_MK, topk_idx_MK = scores_ME.topk(top_k, dim=-1)
    if top_k > 1 and norm_topk_prob:
        topk_weight_MK = topk_weight_MK / (topk_weight_MK.sum(dim=-1, keepdim=True) + 1e-20)
    else:   # the released rule: normalise OR scale, never both
        topk_weight_MK = topk_weight_MK * routed_scaling_factor
    return scores_ME, topk_weight_MK, topk_idx_MK


def prefill_attention_ref(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, softmax_scale: float) -> torch.Tensor:
    """kernels.prefill_attention, one chunk at a time: chunk p's queries (rows cu_q[p]:cu_q[p+1]) are the
    last of its keys (rows cu_k[p]:cu_k[p+1]), so query i sees keys 0..k_len - q_len + i."""
    T, H, _ = q_nope.shape
    acc = _acc(q_nope)
    out = q_nope.new_empty(T, H, v.shape[-1])
    shared_pe = k_pe.dim() == 2
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for p in range(len(bounds_q) - 1):
        qs, qe, ks, ke = bounds_q[p], bounds_q[p + 1], bounds_k[p], bounds_k[p + 1]
        if qe == qs:
            continue
        kpe = k_pe[ks:ke, None, :].expand(-1, H, -1) if shared_pe else k_pe[ks:ke]
        q = torch.cat([q_nope[qs:qe], q_pe[qs:qe]], dim=-1).to(acc).transpose(0, 1)     # [H, Tq, N+R]
        k = torch.cat([k_nope[ks:ke], kpe], dim=-1).to(acc).transpose(0, 1)             # [H, S, N+R]
        mask = torch.ones(qe - qs, ke - ks, dtype=torch.bool, device=q.device).tril((ke - ks) - (qe - qs))
        o = F.scaled_dot_product_attention(q, k, v[ks:ke].to(acc).transpose(0, 1), attn_mask=mask,
                                           scale=softmax_scale)
        out[qs:qe] = o.transpose(0, 1).to(out.dtype)
    return out
