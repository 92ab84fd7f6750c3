"""Fused decode glue swapped into the model's modules from outside: RMSNorm, MLA's post-projection
(c_KV norm + RoPE of q_pe and k_pe) and the greedy router's softmax/top-K, one Triton kernel each.

A decode step at small batch is bound by the number of kernels, not by bytes: the model's plain
RMSNorm is ~7 elementwise kernels, each RoPE ~9, the fp32 router ~6. These overrides compute the
same formulas (fp32 statistics and rotation, fp32 router logits from a cached fp32 weight) in one
or two launches each. They serve only forward passes without autograd on tensors Triton can run
(CUDA; CPU under TRITON_INTERPRET=1); everything else reaches the model's own code, the reference.
"""

from __future__ import annotations

import torch

from ..kernels._triton import HAS_TRITON, jit, tl, triton, use_triton
from ..model import MLA, Router, RMSNorm


def _active(x: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and use_triton(x)


# ----------------------------------------------------------------------------- RMSNorm
@jit
def _rmsnorm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    # The reference order: normalise in fp32, round to the input dtype, then multiply by the weight.
    xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + offs, (w * xn).to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), x [..., N] -> same shape."""
    shape, N = x.shape, x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), N, eps,
                                        BLOCK=triton.next_power_of_2(N), num_warps=4 if N >= 1024 else 1)
    return y.view(shape)


# ----------------------------------------------------------------------------- MLA post-projection
@jit
def _rope_pairs(ptr, offs_pair, mask, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) in fp32, in place."""
    x0 = tl.load(ptr + 2 * offs_pair, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(ptr + 2 * offs_pair + 1, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr + 2 * offs_pair, (x0 * cos - x1 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + 2 * offs_pair + 1, (x0 * sin + x1 * cos).to(ptr.dtype.element_ty), mask=mask)


@jit
def _mla_post_kernel(q_ptr, kv_ptr, w_ptr, ckv_ptr, cos_ptr, sin_ptr,
                     stride_q, stride_kv, stride_ckv, eps,
                     H: tl.constexpr, DQ: tl.constexpr, N: tl.constexpr, C: tl.constexpr, R: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One token: c_kv = RMSNorm(kv[:C]) into ckv; RoPE on kv[C:C+R] and on every head's q[N:N+R], in place."""
    m = tl.program_id(0)
    # c_KV norm (fp32 statistics, the reference rounding order)
    offs_c = tl.arange(0, BLOCK_C)
    mc = offs_c < C
    x = tl.load(kv_ptr + m * stride_kv + offs_c, mask=mc, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    xn = (x * rstd).to(kv_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs_c, mask=mc, other=0.0).to(tl.float32)
    tl.store(ckv_ptr + m * stride_ckv + offs_c, (w * xn).to(ckv_ptr.dtype.element_ty), mask=mc)
    # RoPE: cos/sin [R/2] of this token's position, shared by k_pe and every head of q_pe
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < R // 2
    cos = tl.load(cos_ptr + m * (R // 2) + offs_p, mask=mp, other=0.0)
    sin = tl.load(sin_ptr + m * (R // 2) + offs_p, mask=mp, other=0.0)
    _rope_pairs(kv_ptr + m * stride_kv + C, offs_p, mp, cos, sin)
    offs_h = tl.arange(0, BLOCK_H)
    q_base = q_ptr + m * stride_q + offs_h[:, None] * DQ + N
    mhp = (offs_h[:, None] < H) & mp[None, :]
    _rope_pairs(q_base, offs_p[None, :], mhp, cos[None, :], sin[None, :])


def mla_post_projection(layer: MLA, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [M, H*(N+R)], kv [M, C+R] fresh projections (rotated in place); cos/sin [M, R/2] fp32, contiguous.
    -> q_nope [M,H,N], q_pe [M,H,R] (views of q), c_kv [M,C] (new), k_pe [M,R] (view of kv)."""
    M = q.shape[0]
    H, N, R, C = layer.n_heads, layer.nope_dim, layer.rope_dim, layer.kv_lora_rank
    q3 = q.view(M, H, N + R)
    c_kv = torch.empty(M, C, dtype=torch.promote_types(kv.dtype, layer.kv_a_layernorm.weight.dtype), device=kv.device)
    if M:
        _mla_post_kernel[(M,)](q, kv, layer.kv_a_layernorm.weight, c_kv, cos, sin,
                               q.stride(0), kv.stride(0), c_kv.stride(0), layer.kv_a_layernorm.eps,
                               H=H, DQ=N + R, N=N, C=C, R=R, BLOCK_H=triton.next_power_of_2(H),
                               BLOCK_C=triton.next_power_of_2(C), BLOCK_P=triton.next_power_of_2(R // 2), num_warps=4)
    return q3[..., :N], q3[..., N:], c_kv, kv[:, C:]


def _fused_project(layer: MLA):
    own = layer.project

    def project(x, cos, sin):
        if not _active(x):
            return own(x, cos, sin)
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        q = layer.q_proj(x2) if layer.q_lora_rank is None else layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(x2)))
        kv = layer.kv_a_proj_with_mqa(x2)
        half = cos.shape[-1]   # cos/sin may broadcast over the batch: one row per token for the kernel
        cos2 = cos.expand(B, T, half).reshape(-1, half).float().contiguous()
        sin2 = sin.expand(B, T, half).reshape(-1, half).float().contiguous()
        q_nope, q_pe, c_kv, k_pe = mla_post_projection(layer, q.contiguous(), kv.contiguous(), cos2, sin2)
        return (q_nope.view(B, T, *q_nope.shape[1:]), q_pe.view(B, T, *q_pe.shape[1:]),
                c_kv.view(B, T, -1), k_pe.view(B, T, -1))
    return project


# ----------------------------------------------------------------------------- router
@jit
def _softmax_topk_kernel(logits_ptr, scores_ptr, topw_ptr, topi_ptr, scale,
                         E: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr, BLOCK_E: tl.constexpr):
    """One token: scores = softmax(logits) in fp32, greedy top-K, weights normalised or scaled."""
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


def _router_weight_fp32(router: Router) -> torch.Tensor:
    """The router weight in fp32, cached (refreshed when the parameter changes in place or is replaced)."""
    w = router.weight
    key = (w.data_ptr(), None if w.is_inference() else w._version)   # inference tensors carry no version
    cached = router.__dict__.get("_fused_w32")
    if cached is None or cached[0] != key:
        cached = (key, w.detach().float().contiguous())
        router.__dict__["_fused_w32"] = cached
    return cached[1]


def route(router: Router, x_MD: torch.Tensor):
    """The greedy Router's forward: fp32 logits (one GEMM) + softmax/top-K/weights in one kernel.
    -> scores [M,E] fp32, topk_weight [M,K] fp32, topk_idx [M,K] int64."""
    M = x_MD.shape[0]
    E, K = router.n_experts, router.top_k
    logits = torch.nn.functional.linear(x_MD.float(), _router_weight_fp32(router)).contiguous()
    scores = torch.empty(M, E, dtype=torch.float32, device=x_MD.device)
    topw = torch.empty(M, K, dtype=torch.float32, device=x_MD.device)
    topi = torch.empty(M, K, dtype=torch.int64, device=x_MD.device)
    if M:
        _softmax_topk_kernel[(M,)](logits, scores, topw, topi, float(router.routed_scaling_factor),
                                   E=E, K=K, NORM=bool(K > 1 and router.norm_topk_prob),
                                   BLOCK_E=triton.next_power_of_2(E), num_warps=1)
    return scores, topw, topi


def _fused_router(router: Router):
    own = router.forward

    def forward(x):
        # Group- or device-limited routing stays on the model's path.
        if not _active(x) or router.n_group > 1 or router.device_limit is not None:
            return own(x)
        return route(router, x)
    return forward


def _fused_norm(norm: RMSNorm):
    own = norm.forward

    def forward(x):
        return rmsnorm(x, norm.weight, norm.eps) if _active(x) else own(x)
    return forward


# ----------------------------------------------------------------------------- routed experts, 1-2 tokens
_SMALL_M_IDS: dict = {}


def fused_moe_few_tokens(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                         topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor) -> torch.Tensor:
    """The fused-MoE kernels with one row block per (token, expert) assignment: no sorting at all.

    `latentmoe.kernels.fused_moe` first groups assignments by expert (a dozen small kernels) so each
    expert is read once. With M*K assignments of one or two tokens, experts rarely repeat, so a fixed
    layout (block a holds assignment a, the rest padding) reads about the same bytes with 2 kernels
    instead of ~14. Same kernels, same arithmetic per assignment.
    """
    from ..kernels._triton import INTERPRET
    from ..kernels.moe import DECODE_CONFIG, _moe_down_kernel, _moe_gate_up_kernel
    M, D = x_MD.shape
    K = topk_idx_MK.shape[1]
    E, I = down_proj.shape[0], down_proj.shape[2]
    A = M * K
    cfg = DECODE_CONFIG
    bm, bk, nw, ns = cfg["block_m"], cfg["block_k"], cfg["num_warps"], cfg["num_stages"]
    key = (A, bm, x_MD.device)
    sorted_ids = _SMALL_M_IDS.get(key)
    if sorted_ids is None:   # built outside graph capture: the warm-up step comes first
        p = torch.arange(A * bm, device=x_MD.device)
        sorted_ids = torch.where(p % bm == 0, p // bm, A).to(torch.int32)
        _SMALL_M_IDS[key] = sorted_ids
    x_MD = x_MD if x_MD.stride(-1) == 1 else x_MD.contiguous()
    gate_up_proj = gate_up_proj.to(x_MD.dtype).contiguous()   # no-ops for the engine's weights
    down_proj = down_proj.to(x_MD.dtype).contiguous()
    block_expert = topk_idx_MK.reshape(-1)            # block a computes assignment a's expert
    h_PI = torch.empty(A * bm, I, dtype=x_MD.dtype, device=x_MD.device)
    _moe_gate_up_kernel[(triton.cdiv(I, cfg["block_n1"]), A)](
        x_MD, gate_up_proj, h_PI, h_PI, sorted_ids, block_expert,
        x_MD.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), h_PI.stride(0), 0, A, D, I, E,
        TOP_K=K, BLOCK_M=bm, BLOCK_N=cfg["block_n1"], BLOCK_K=bk, UPCAST=INTERPRET, STORE_GU=False,
        num_warps=nw, num_stages=ns)
    y_AD = torch.empty(A, D, dtype=x_MD.dtype, device=x_MD.device)
    weight_A = topk_weight_MK.reshape(-1).contiguous()
    _moe_down_kernel[(triton.cdiv(D, cfg["block_n2"]), A)](
        h_PI, down_proj, y_AD, sorted_ids, block_expert, weight_A,
        h_PI.stride(0), down_proj.stride(0), down_proj.stride(1), y_AD.stride(0), A, I, D, E,
        BLOCK_M=bm, BLOCK_N=cfg["block_n2"], BLOCK_K=bk, UPCAST=INTERPRET, num_warps=nw, num_stages=ns)
    return y_AD.view(M, K, D).sum(dim=1, dtype=torch.float32).to(x_MD.dtype)


# Up to this many tokens the unsorted layout pays: 2 tokens x 6 of 64 experts repeat an expert read ~0.6
# times a layer (~3 us of bytes) against ~12 fewer launches; at 4 tokens the two are about even.
FEW_TOKENS = 2


# ----------------------------------------------------------------------------- switch
def set_fused_ops(model, enable: bool) -> int:
    """Swap the fused RMSNorm / MLA post-projection / router forwards into `model` (or restore its own).

    Returns the number of modules switched (0 when Triton is unavailable).
    """
    if not HAS_TRITON:
        return 0
    n = 0
    for module in model.modules():
        name = "project" if isinstance(module, MLA) else "forward"
        if not isinstance(module, (RMSNorm, MLA, Router)):
            continue
        if name in module.__dict__:
            del module.__dict__[name]          # back to the class's method
        if enable:
            make = _fused_norm if isinstance(module, RMSNorm) else _fused_project if isinstance(module, MLA) else _fused_router
            setattr(module, name, make(module))
        n += 1
    return n


__all__ = ["set_fused_ops", "rmsnorm", "mla_post_projection", "route", "fused_moe_few_tokens", "FEW_TOKENS"]
