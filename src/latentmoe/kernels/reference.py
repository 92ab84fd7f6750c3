"""Plain-PyTorch references for the kernels: the definitions the fast paths are tested against.

Shape legend: B batch (sequences), H heads, C latent width (kv_lora_rank), R rope width,
NB/BS cache blocks / tokens per block, MB block-table width, M tokens, K experts per token,
E experts, D hidden, I expert width.
"""
import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.dtype:
    """fp32 accumulation, or fp64 when the inputs are fp64 (tests' high-precision references)."""
    return torch.promote_types(t.dtype, torch.float32)


def mla_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                   block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Absorbed decode attention, one new token per sequence: an MQA with C+R wide keys, C wide values.

    score[b,h,s] = (q_lat[b,h] . c_kv[b,s] + q_pe[b,h] . k_pe[b,s]) * scale, softmax over the
    seq_lens[b] cached tokens (fp32), o[b,h] = sum_s p[b,h,s] c_kv[b,s]. Loops over sequences, so
    it holds only one sequence's keys at a time; the result has q_lat's dtype.
    """
    B, H, C = q_lat.shape
    BS = kv_cache.shape[1]
    out_BHC = torch.empty_like(q_lat)
    acc = _acc(q_lat)
    for b in range(B):
        L = int(seq_lens[b])
        n_blocks = (L + BS - 1) // BS
        rows_SX = kv_cache[block_table[b, :n_blocks].long()].reshape(-1, kv_cache.shape[-1])[:L].to(acc)
        c_kv_SC, k_pe_SR = rows_SX[:, :C], rows_SX[:, C:]
        scores_HS = (q_lat[b].to(acc) @ c_kv_SC.T + q_pe[b].to(acc) @ k_pe_SR.T) * softmax_scale
        out_BHC[b] = (scores_HS.softmax(dim=-1) @ c_kv_SC).to(q_lat.dtype)
    return out_BHC


def mla_decode_einsum(q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv_BSC: torch.Tensor, k_pe_BSR: torch.Tensor,
                      softmax_scale: float) -> torch.Tensor:
    """The batched plain-PyTorch absorbed attention over a dense (unpaged) latent cache: the speed baseline."""
    scores_BHS = (torch.einsum("bhc,bsc->bhs", q_lat, c_kv_BSC)
                  + torch.einsum("bhr,bsr->bhs", q_pe, k_pe_BSR)).float() * softmax_scale
    p_BHS = scores_BHS.softmax(dim=-1).to(c_kv_BSC.dtype)
    return torch.einsum("bhs,bsc->bhc", p_BHS, c_kv_BSC)


def write_latent_cache_ref(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, c_kv: torch.Tensor,
                           k_pe: torch.Tensor) -> None:
    """kv_cache row `slot` (= block * BS + offset) <- [c_kv | k_pe]; negative slots are padding and skipped."""
    keep = slot_mapping >= 0
    rows_X = kv_cache.view(-1, kv_cache.shape[-1])
    rows_X[slot_mapping[keep]] = torch.cat([c_kv[keep], k_pe[keep]], dim=-1).to(kv_cache.dtype)


def fused_moe_ref(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                  topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor) -> torch.Tensor:
    """Routed experts, one expert at a time in fp32: y[m] = sum_k w[m,k] FFN_{idx[m,k]}(x[m]).

    gate_up_proj [E, 2I, D] rows [gate | up], down_proj [E, D, I]; SwiGLU FFN(x) = down(silu(gate x) * up x).
    """
    I = down_proj.shape[-1]
    acc = _acc(x_MD)
    y_MD = torch.zeros(x_MD.shape, dtype=acc, device=x_MD.device)
    for e in topk_idx_MK.unique().tolist():
        tok, slot = (topk_idx_MK == e).nonzero(as_tuple=True)
        h_T2I = x_MD[tok].to(acc) @ gate_up_proj[e].to(acc).T
        a_TI = F.silu(h_T2I[:, :I]) * h_T2I[:, I:]
        y_MD.index_add_(0, tok, (a_TI @ down_proj[e].to(acc).T) * topk_weight_MK[tok, slot].to(acc)[:, None])
    return y_MD.to(x_MD.dtype)
