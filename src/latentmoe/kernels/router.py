"""The greedy router's softmax, top-K and weight rule in one Triton kernel after the fp32 logits GEMM, and at
one token the GEMM and the rule in one launch (`route_one_token`).

The model's router runs ~6 small kernels after its GEMM; at decode batch sizes their launches, not
their bytes, are the cost. Same formulas in fp32; top-K by repeated arg-max, lowest index on ties.
"""
import torch

from ._triton import INTERPRET, cast, jit, new_buffer, pdl_launch, tl, triton, use_triton, wait_for_inputs
from .norm import rms_normed
from .reference import softmax_topk_ref
from .skinny import _rows_dot, _store_rows, choose_skinny_config


@jit
def _softmax_topk_row(logits_ptr, scores_ptr, topw_ptr, topi_ptr, m, scale, E: tl.constexpr, K: tl.constexpr,
                      NORM: tl.constexpr, BLOCK_E: tl.constexpr, VOLATILE: tl.constexpr):
    """Token m: scores = softmax(logits) in fp32, greedy top-K, weights normalised or scaled. VOLATILE: the
    logits are read past the caches (other programs of the same launch wrote them)."""
    offs_e = tl.arange(0, BLOCK_E)
    me = offs_e < E
    logits = tl.load(logits_ptr + m * E + offs_e, mask=me, other=float("-inf"), volatile=VOLATILE)
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


@jit
def _softmax_topk_kernel(logits_ptr, scores_ptr, topw_ptr, topi_ptr, scale,
                         E: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr,
                         PDL: tl.constexpr):
    """One program per token (_softmax_topk_row)."""
    wait_for_inputs(PDL)
    _softmax_topk_row(logits_ptr, scores_ptr, topw_ptr, topi_ptr, tl.program_id(0), scale, E, K, NORM, BLOCK_E,
                      False)


@jit
def _route_one_token_kernel(x_ptr, w_ptr, logits_ptr, scores_ptr, topw_ptr, topi_ptr, done_ptr, D, scale,
                            E: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Each program: BLOCK_N fp32 logits of the token (skinny.py's few-row GEMM, its tiles), then
    `_last_applies_rule`."""
    n0 = tl.program_id(0) * BLOCK_N
    acc = _rows_dot(x_ptr, w_ptr, w_ptr, 1, E, D, D, D, 1, 0, n0, 1, BLOCK_N, BLOCK_K, False, 128, PDL)
    _store_rows(logits_ptr, acc, 1, E, E, n0, 1, BLOCK_N)
    _last_applies_rule(logits_ptr, scores_ptr, topw_ptr, topi_ptr, done_ptr, scale, E, K, NORM, BLOCK_E)


@jit
def _route_add_norm_kernel(h_ptr, d_ptr, nw_ptr, s_ptr, xn_ptr, w_ptr, logits_ptr, scores_ptr, topw_ptr, topi_ptr,
                           done_ptr, D, eps, scale, E: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           INTERPRETED: tl.constexpr, PDL: tl.constexpr):
    """The block's residual add and norm, then routing, for one token: every program forms s = h + d and
    x = RMSNorm(s) in registers, rounded as norm.py's add_rms_norm rounds them (program 0 also stores both:
    the residual stream and the experts' input), multiplies x by its BLOCK_N router rows, then
    `_last_applies_rule`. The router rows' load goes before the wait (no earlier kernel writes them)."""
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    w = tl.load(w_ptr + offs_n[:, None] * D + offs[None, :], mask=(offs_n[:, None] < E) & mask[None, :], other=0.0)
    wait_for_inputs(PDL)
    dtype = s_ptr.dtype.element_ty
    sv = cast(tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
              + tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32), dtype, INTERPRETED).to(tl.float32)
    x = rms_normed(sv, nw_ptr, offs, mask, D, eps, dtype, xn_ptr.dtype.element_ty)
    if tl.program_id(0) == 0:
        tl.store(s_ptr + offs, sv.to(dtype), mask=mask)
        tl.store(xn_ptr + offs, x, mask=mask)
    logits = tl.sum(x.to(tl.float32)[None, :] * w.to(tl.float32), axis=1)
    tl.store(logits_ptr + offs_n, logits, mask=offs_n < E)
    _last_applies_rule(logits_ptr, scores_ptr, topw_ptr, topi_ptr, done_ptr, scale, E, K, NORM, BLOCK_E)


@jit
def _last_applies_rule(logits_ptr, scores_ptr, topw_ptr, topi_ptr, done_ptr, scale, E: tl.constexpr,
                       K: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr):
    """After a program has stored its logits: one count on done_ptr; the program that counts last applies the
    routing rule to all E logits and sets the count back to 0 for the next launch. The count's acquire-release
    atomic orders every program's logits before the last one's reads."""
    if tl.atomic_add(done_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        _softmax_topk_row(logits_ptr, scores_ptr, topw_ptr, topi_ptr, 0, scale, E, K, NORM, BLOCK_E, True)
        tl.store(done_ptr, 0)


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


# The add-and-norm variant holds the whole row in registers: up to this width (V2-Lite's 2,048 and the like).
ROUTE_ADD_NORM_MAX_D = 4096


def route_one_token(x: torch.Tensor, weight: torch.Tensor, done: torch.Tensor, top_k: int, norm_topk_prob: bool,
                    routed_scaling_factor: float, add_norm: tuple | None = None):
    """softmax_topk(x @ weight^T in fp32, ...) for one token x [1, D] (weight [E, D] in x's dtype) in one launch,
    or None where it does not apply (more rows, no Triton: the caller runs the GEMM and softmax_topk).
    `done`: a zeroed int32 [1] the kernel counts its programs on (left at 0; one per caller, so that no two
    launches in flight share it). The logits are those skinny_linear(x, weight, out_dtype=torch.float32) gives
    (the same tiles), so the routing is too.

    add_norm = (delta, norm_weight, eps): x is the residual stream h, and the token routed is
    RMSNorm(h + delta), formed in the same launch -> (scores, topk_weight, topk_idx, h + delta, RMSNorm(h + delta)),
    both as kernels.add_rms_norm returns them (one launch a layer fewer at batch-1 decode); None also where D
    exceeds ROUTE_ADD_NORM_MAX_D."""
    if not use_triton(x) or x.dim() != 2 or x.shape[0] != 1 or weight.dtype != x.dtype or not x.is_contiguous() \
            or not weight.is_contiguous() or weight.shape[1] != x.shape[1]:
        return None
    E, D = weight.shape
    if add_norm is not None:
        delta, norm_weight, eps = add_norm
        # (the router's GEMM takes the normed row in the weight's dtype)
        if D > ROUTE_ADD_NORM_MAX_D or delta.shape != x.shape or delta.dtype != x.dtype or not delta.is_contiguous() \
                or norm_weight.shape != (D,) or not norm_weight.is_contiguous() \
                or torch.promote_types(x.dtype, norm_weight.dtype) != x.dtype:
            return None
    scores = new_buffer((1, E), torch.float32, x.device)
    topw = new_buffer((1, top_k), torch.float32, x.device)
    topi = new_buffer((1, top_k), torch.int64, x.device)
    logits = new_buffer((1, E), torch.float32, x.device)
    rule = dict(E=E, K=top_k, NORM=bool(top_k > 1 and norm_topk_prob), BLOCK_E=triton.next_power_of_2(E))
    if add_norm is None:
        cfg = choose_skinny_config(1, D, False)
        _route_one_token_kernel[(triton.cdiv(E, cfg["block_n"]),)](
            x, weight, logits, scores, topw, topi, done, D, float(routed_scaling_factor), **rule,
            BLOCK_N=cfg["block_n"], BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            **pdl_launch(x))
        return scores, topw, topi
    s = new_buffer((1, D), x.dtype, x.device)
    xn = new_buffer((1, D), x.dtype, x.device)
    block_n = 4
    _route_add_norm_kernel[(triton.cdiv(E, block_n),)](
        x, delta, norm_weight, s, xn, weight, logits, scores, topw, topi, done, D, eps, float(routed_scaling_factor),
        **rule, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(D), INTERPRETED=INTERPRET,
        num_warps=4 if D <= 2048 else 8,
        **pdl_launch(x))
    return scores, topw, topi, s, xn


__all__ = ["softmax_topk", "route_one_token", "ROUTE_ADD_NORM_MAX_D"]
