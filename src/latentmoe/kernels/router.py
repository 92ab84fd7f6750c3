"""The greedy router's softmax, top-K and weight rule in one Triton kernel (the fp32 logits GEMM stays in torch).

The model's router runs ~6 small kernels after its GEMM; at decode batch sizes their launches, not
their bytes, are the cost. Same formulas in fp32; top-K by repeated arg-max, lowest index on ties.
"""
import torch

from ._triton import jit, new_buffer, pdl_launch, tl, triton, use_triton, wait_for_inputs
from .reference import softmax_topk_ref


@jit
def _softmax_topk_kernel(logits_ptr, scores_ptr, topw_ptr, topi_ptr, scale,
                         E: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr,
                         PDL: tl.constexpr):
    """One token: scores = softmax(logits) in fp32, greedy top-K, weights normalised or scaled."""
    wait_for_inputs(PDL)
    m = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    me = offs_e < E
    logits = tl.load(logits_ptr + m * E + offs_e, mask=me, other=float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    tl.store(scores_ptr + m * E + offs_e, p, mask=me)
    # Greedy top-K by repeated arg-max (lowest index on ties); chosen entries drop to -1.
    rest = tl.where(me, p, -1.0)
    total = 0.0
    for k in tl.static_range(K):
        best = tl.max(rest, axis=0)
        idx = tl.min(tl.where(rest == best, offs_e, BLOCK_E), axis=0)
        tl.store(topi_ptr + m * K + k, idx.to(tl.int64))
        tl.store(topw_ptr + m * K + k, best)
        total += best
        rest = tl.where(offs_e == idx, -1.0, rest)
    # The released rule: normalise OR scale, never both (scale 1.0 leaves the weights exact).
    for k in tl.static_range(K):
        wk = tl.load(topw_ptr + m * K + k)
        if NORM:
            wk = wk / (total + 1e-20)
        else:
            wk = wk * scale
        tl.store(topw_ptr + m * K + k, wk)


def softmax_topk(logits_ME: torch.Tensor, top_k: int, norm_topk_prob: bool, routed_scaling_factor: float):
    """Greedy routing from fp32 router logits [M, E] -> scores [M,E] fp32, topk_weight [M,K] fp32,
    topk_idx [M,K] int64 (weights normalised when top_k > 1 and norm_topk_prob, else scaled).

    Triton on CUDA (CPU under TRITON_INTERPRET=1), `softmax_topk_ref` elsewhere.
    """
    if not use_triton(logits_ME):
        return softmax_topk_ref(logits_ME, top_k, norm_topk_prob, routed_scaling_factor)
    M, E = logits_ME.shape
    logits_ME = logits_ME.contiguous()
    assert logits_ME.dtype == torch.float32
    scores = new_buffer((M, E), torch.float32, logits_ME.device)
    topw = new_buffer((M, top_k), torch.float32, logits_ME.device)
    topi = new_buffer((M, top_k), torch.int64, logits_ME.device)
    if M:
        _softmax_topk_kernel[(M,)](logits_ME, scores, topw, topi, float(routed_scaling_factor),
                                   E=E, K=top_k, NORM=bool(top_k > 1 and norm_topk_prob),
                                   BLOCK_E=triton.next_power_of_2(E), num_warps=1, **pdl_launch(logits_ME))
    return scores, topw, topi


__all__ = ["softmax_topk"]
