"""DeepSeek-V2 in one file: RMSNorm, YaRN RoPE, Multi-head Latent Attention, DeepSeekMoE.

Reads top to bottom. Parameter names equal the released checkpoint names except that routed
experts are stacked per layer (`mlp.experts.gate_up_proj [E, 2I, D]`, `mlp.experts.down_proj
[E, D, I]`) so they run as grouped GEMMs; `checkpoint/hf.py` maps the names.

Shape legend
  B batch, T query tokens, S key tokens, D hidden, H heads, N qk_nope_head_dim,
  R qk_rope_head_dim, V v_head_dim, C kv_lora_rank (latent), E routed experts,
  K experts per token, I expert width, M flattened tokens (B*T), A = M*K assignments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, yarn_mscale


# ----------------------------------------------------------------------------- norm
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, then back to the input dtype before the weight (the reference order).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------- rope
def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the RoPE (MLA: the decoupled key, dim R; a baseline: its whole head) and the cos/sin factor.

    YaRN: frequencies below the beta_slow correction dim are interpolated (divided by `factor`),
    those above beta_fast are kept, with a linear ramp between; cos/sin are multiplied by
    mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for the released configs).
    """
    dim, base = cfg.rope_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs = cfg.rope_scaling
    if rs is None or rs["type"] != "yarn":
        return inv_freq, 1.0
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # weight of the original (extrapolated) frequency
    inv_freq = inv_freq / factor * ramp + inv_freq * keep
    mscale = yarn_mscale(factor, rs.get("mscale") or 1.0) / yarn_mscale(factor, rs.get("mscale_all_dim") or 0.0)
    return inv_freq, mscale


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.reset()

    def reset(self) -> None:
        # A plain attribute, not a buffer: `model.to(bfloat16)` must not round the frequencies.
        self.inv_freq, self.mscale = rope_inv_freq(self.cfg)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, R/2] in fp32."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self.inv_freq
        return freqs.cos() * self.mscale, freqs.sin() * self.mscale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) — the released weights' layout.

    x [..., R] with cos/sin broadcastable to [..., R/2]. Computed in fp32.
    (Plain `rotate_half` on these weights is wrong: it pairs x[i] with x[i+R/2].)
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


# ----------------------------------------------------------------------------- attention
class AttentionBackend(Protocol):
    """Attention over a KV cache, supplied from outside the model (the engine's paged cache).

    Gets the layer and its fresh projections; stores c_kv/k_pe where it keeps its cache and
    returns the attention output o [B, T, H, V] (before o_proj).
    """

    def attend(self, layer: "MLA", q_nope: torch.Tensor, q_pe: torch.Tensor,
               c_kv: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor: ...


class MLA(nn.Module):
    r"""Multi-head Latent Attention.

    Every token leaves one latent c_KV = norm(W_DKV h) [C] and one decoupled key k_R = RoPE(W_KR h)
    [R] shared by all heads; that (C + R) is all a cache must hold. Per head h:

        k_h = [W_UK,h c_KV ; k_R]      v_h = W_UV,h c_KV      q_h = [q_nope,h ; q_pe,h]
        score_h(t, s) = q_nope,h(t) . (W_UK,h c_KV(s)) + q_pe,h(t) . k_R(s)
                      = (W_UK,h^T q_nope,h(t)) . c_KV(s) + q_pe,h(t) . k_R(s)
        o_h(t) = sum_s p_h(t, s) W_UV,h c_KV(s) = W_UV,h (sum_s p_h(t, s) c_KV(s))

    *Decompressed* path (training, prefill): build k_h and v_h for every key (kv_b_proj), run
    ordinary attention with 192-dim keys and 128-dim values per head.
    *Absorbed* path (decode): fold W_UK into the query (q_lat = W_UK^T q_nope, [H, C]) and W_UV
    into the output, so attention reads only the latent cache: an MQA whose single key is
    [c_KV ; k_R] (C+R = 576) and single value is c_KV (C = 512). Cost per key drops from
    H*(N+V) to C+R bytes read, at the price of C-wide dot products per head.
    kv_b_proj's rows per head are [k_nope (N) | v (V)], so W_UK,h = W[h, :N], W_UV,h = W[h, N:].
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.softmax_scale = cfg.softmax_scale
        self.absorb = False  # switch with DeepseekV2ForCausalLM.set_attention_mode
        D, H, C, R = cfg.hidden_size, self.n_heads, self.kv_lora_rank, self.rope_dim
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + R, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(C, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(C, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=cfg.attention_bias)

    # W_UK [H, N, C] and W_UV [H, V, C]: views into kv_b_proj, never copies.
    @property
    def w_uk(self) -> torch.Tensor:
        return self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, -1)[:, : self.nope_dim]

    @property
    def w_uv(self) -> torch.Tensor:
        return self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, -1)[:, self.nope_dim:]

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, D] -> q_nope [B,T,H,N], q_pe [B,T,H,R] (rotated), c_kv [B,T,C] (normed), k_pe [B,T,R] (rotated)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # the norm applies to c_KV only, never to k_R
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])
        k_pe = apply_rope(k_pe, cos, sin)
        return q_nope, q_pe, c_kv, k_pe

    def attend_decompressed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Rebuild per-head K/V from the latent and run SDPA. mask: None (causal, T == S) or bool [B,1,T,S]."""
        B, S, _ = c_kv.shape
        H = self.n_heads
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None and q.shape[1] > 1, scale=self.softmax_scale)
        return o.transpose(1, 2)  # [B, T, H, V]

    def attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Attention over the latent only (see the class docstring). Same arguments and result."""
        T, S = q_nope.shape[1], c_kv.shape[1]
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, self.w_uk)
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, c_kv)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)).float() * self.softmax_scale
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", p, c_kv)
        return torch.einsum("bthc,hvc->bthv", o_lat, self.w_uv)

    def forward(self, x, cos, sin, mask=None, backend: AttentionBackend | None = None):
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if backend is not None:
            o = backend.attend(self, q_nope, q_pe, c_kv, k_pe)
        elif self.absorb:
            o = self.attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            o = self.attend_decompressed(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(o.flatten(2))


class Attention(nn.Module):
    """The report's attention baselines: MHA, GQA and MQA with standard RoPE on the whole head.

    H query heads share G key/value heads (G = H: MHA, 1 < G < H: GQA, G = 1: MQA), head dim V
    for queries, keys and values alike; a cache holds 2 G V per token and layer. Experiments only:
    the engine serves MLA.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.softmax_scale = self.head_dim ** -0.5
        if cfg.rope_scaling is not None and cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling.get("mscale_all_dim"):
            self.softmax_scale *= yarn_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"]) ** 2
        D, H, G, V = cfg.hidden_size, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * V, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, G * V, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, G * V, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * V, D, bias=cfg.attention_bias)

    def forward(self, x, cos, sin, mask=None, backend: AttentionBackend | None = None):
        if backend is not None:
            raise NotImplementedError("the engine's cache backends serve MLA only")
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos[:, :, None], sin[:, :, None])
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos[:, :, None], sin[:, :, None])
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        # Each key/value head serves H/G consecutive query heads.
        k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=2) for t in (k, v))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask, is_causal=mask is None and T > 1, scale=self.softmax_scale)
        return self.o_proj(o.transpose(1, 2).flatten(2))


# ----------------------------------------------------------------------------- feed-forward
class MLP(nn.Module):
    """SwiGLU: the dense layers and the shared experts (width n_shared * moe_intermediate_size)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class RouterOutput:
    """What one MoE layer's router decided, for the balance losses and load statistics."""
    scores: torch.Tensor      # [M, E] fp32 softmax affinities s_{i,t} (with gradient)
    topk_idx: torch.Tensor    # [M, K] chosen experts
    topk_weight: torch.Tensor  # [M, K] fp32 gate values g_{i,t} actually applied (0 where dropped)
    kept: torch.Tensor | None = None  # [M, K] bool, False where token dropping removed the assignment


def limit_to_groups(scores: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Zero the affinities outside each token's `topk_groups` best groups (group score = MAX).

    This is V2's group_limited_greedy and the report's device-limited routing (groups = devices,
    topk_groups = M). DeepSeek-V3's top-2-sum group score is a different rule.
    """
    M, E = scores.shape
    group_scores = scores.view(M, n_groups, E // n_groups).amax(dim=-1)   # [M, G]
    keep_groups = group_scores.topk(topk_groups, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    return scores.masked_fill(~group_mask.repeat_interleave(E // n_groups, dim=1), 0.0)


class Router(nn.Module):
    """The gate: affinities s = softmax(u . e_i) in fp32, then top-K (optionally group-limited)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.n_experts = cfg.n_routed_experts
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        limited = cfg.topk_method == "group_limited_greedy"
        self.n_group = cfg.n_group if limited else 1
        self.topk_group = cfg.topk_group if limited else 1
        # Training may impose device-limited routing over D groups, M devices per token:
        # (D, M) set from outside (train or expert parallelism); None keeps the config's rule.
        self.device_limit: tuple[int, int] | None = None
        self.weight = nn.Parameter(torch.empty(self.n_experts, cfg.hidden_size))

    def forward(self, x: torch.Tensor):
        """x [M, D] -> scores [M, E], topk_weight [M, K], topk_idx [M, K] (weights in fp32)."""
        # fp32 affinities even under autocast (which would otherwise run this matmul in bf16)
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)
        masked = scores
        if self.device_limit is not None:
            masked = limit_to_groups(masked, *self.device_limit)
        if self.n_group > 1:
            masked = limit_to_groups(masked, self.n_group, self.topk_group)
        topk_weight, topk_idx = masked.topk(self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        else:  # the released code applies normalisation OR scaling, never both
            topk_weight = topk_weight * self.routed_scaling_factor
        return scores, topk_weight, topk_idx


def grouped_linear(x_AD: torch.Tensor, w_EOD: torch.Tensor, counts_E: torch.Tensor,
                   use_grouped_mm: bool) -> torch.Tensor:
    """Rows of x sorted by expert, counts per expert -> x_e @ w_e^T for each expert's rows.

    `torch._grouped_mm` does it in one kernel (CUDA, bf16); the loop is the exact reference and
    the fallback elsewhere. The loop's `counts.tolist()` is a host sync: fine off the hot path.
    """
    if use_grouped_mm:
        offs = counts_E.cumsum(0, dtype=torch.int32)
        return torch._grouped_mm(x_AD, w_EOD.transpose(-2, -1), offs=offs)
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            outs.append(x_AD[start:start + n] @ w_EOD[e].t())
            start += n
    if not outs:
        return x_AD.new_zeros(0, w_EOD.shape[1])
    return torch.cat(outs)


def grouped_swiglu(x_AD: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, counts_E: torch.Tensor,
                   use_grouped_mm: bool) -> torch.Tensor:
    """Each expert's SwiGLU FFN over its rows of x_AD (sorted by expert: counts_E[e] rows for expert e)."""
    h_A2I = grouped_linear(x_AD, w_gate_up, counts_E, use_grouped_mm)
    gate, up = h_A2I.chunk(2, dim=-1)
    return grouped_linear(F.silu(gate) * up, w_down, counts_E, use_grouped_mm)


class Experts(nn.Module):
    """All routed experts of one layer, stacked, run as grouped GEMMs over expert-sorted tokens."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.n_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))  # rows: [gate (I) | up (I)]
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.impl = "auto"  # "auto" | "grouped_mm" | "loop" | "triton"

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.impl == "loop":
            return False
        if self.impl == "grouped_mm":
            return True
        # Its operands' row strides must be multiples of 16 bytes: hidden and expert widths divisible by 8.
        aligned = x.shape[-1] % 8 == 0 and self.down_proj.shape[-1] % 8 == 0
        return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and aligned

    def forward(self, x_MD: torch.Tensor, topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor) -> torch.Tensor:
        M, K = topk_idx_MK.shape
        out_dtype = x_MD.dtype
        # Autocast does not cover grouped GEMMs: cast to its compute dtype here, as it would for a Linear.
        if x_MD.is_cuda and torch.is_autocast_enabled("cuda"):
            x_MD = x_MD.to(torch.get_autocast_dtype("cuda"))
        w_gate_up, w_down = self.gate_up_proj.to(x_MD.dtype), self.down_proj.to(x_MD.dtype)
        if self.impl == "triton":  # Triton grouped GEMMs with their own backward (opt-in training path)
            from .kernels.moe_autograd import fused_moe_train
            return fused_moe_train(x_MD, w_gate_up, w_down, topk_idx_MK, topk_weight_MK).to(out_dtype)
        # Sort the M*K (token, expert) assignments by expert so each expert's tokens are contiguous.
        order_A = topk_idx_MK.flatten().argsort(stable=True)
        token_A = order_A // K
        # A scatter, not torch.bincount: bincount on CUDA reads the max index back to the host,
        # a sync that would break CUDA-graph capture of the decode step.
        idx_A = topk_idx_MK.flatten()
        counts_E = torch.zeros(self.n_experts, dtype=torch.int64, device=idx_A.device).scatter_add_(
            0, idx_A, torch.ones_like(idx_A))
        y_AD = grouped_swiglu(x_MD[token_A], w_gate_up, w_down, counts_E, self.use_grouped_mm(x_MD))
        y_AD = (y_AD.float() * topk_weight_MK.flatten()[order_A, None]).to(out_dtype)
        return x_MD.new_zeros(M, x_MD.shape[1], dtype=out_dtype).index_add_(0, token_A, y_AD)


class MoE(nn.Module):
    """DeepSeekMoE: h = u + sum_shared FFN(u) + sum_routed g_i FFN_i(u) (the residual is added by the block)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None
        # Token dropping during training (report 2.2.4) is applied from outside by setting
        # `dropper`: a callable (scores, topk_idx, topk_weight) -> keep mask [M, K] or None.
        self.dropper = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = x.shape
        x_MD = x.reshape(-1, shape[-1])
        scores, topk_weight, topk_idx = self.gate(x_MD)
        kept = None
        if self.dropper is not None and self.training:
            kept = self.dropper(scores, topk_idx, topk_weight)
            if kept is not None:
                topk_weight = topk_weight * kept
        y = self.experts(x_MD, topk_idx, topk_weight)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x_MD)
        return y.view(shape), RouterOutput(scores, topk_idx, topk_weight, kept)


# ----------------------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx) if cfg.attention_type == "mla" else Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, mask=None, backend=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, backend)
        if self.is_moe:
            out, router = self.mlp(self.post_attention_layernorm(h))
            return h + out, router
        return h + self.mlp(self.post_attention_layernorm(h)), None


class DeepseekV2Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)


class DeepseekV2ForCausalLM(nn.Module):
    """input_ids [B, T] -> logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        """Share lm_head with the embedding when configured (again after `to_empty`, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_attention_mode(self, mode: str) -> None:
        """'decompressed' (rebuild K/V, the reference) or 'absorbed' (latent-only attention)."""
        if mode not in ("decompressed", "absorbed"):
            raise ValueError(f"attention mode must be 'decompressed' or 'absorbed', got {mode!r}")
        if self.config.attention_type != "mla":
            raise ValueError(f"attention modes are MLA's; this model's attention_type is {self.config.attention_type!r}")
        for layer in self.model.layers:
            layer.self_attn.absorb = mode == "absorbed"

    def set_experts_impl(self, impl: str) -> None:
        """'auto' (grouped_mm on CUDA bf16, loop elsewhere), 'grouped_mm', 'loop' or 'triton' (kernels.moe_autograd)."""
        if impl not in ("auto", "grouped_mm", "loop", "triton"):
            raise ValueError(f"experts impl must be 'auto', 'grouped_mm', 'loop' or 'triton', got {impl!r}")
        for layer in self.model.layers:
            if layer.is_moe:
                layer.mlp.experts.impl = impl

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       positions: torch.Tensor | None = None, backend: AttentionBackend | None = None,
                       layers: Sequence[int] | None = None):
        """Final normed hidden states [B, T, D] and the router outputs of each MoE layer.

        attention_mask [B, S] (1 = real token) handles padded batches without a backend.
        positions [B, T] default to 0..T-1.
        layers: indices of the decoder layers to run, in order (default all). Not the model's function with
        fewer layers: an engine's start-up runs one layer of each kind to compile that kind's kernels.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        mask = None
        if attention_mask is not None and backend is None:
            valid = attention_mask.to(torch.bool)
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None] & valid[:, None, :]
            # Rows of padding would be all -inf (NaN): let them see themselves; their output is unused.
            mask = (mask | torch.eye(T, dtype=torch.bool, device=mask.device))[:, None]
        cos, sin = self.model.rotary(positions)
        h = self.model.embed_tokens(input_ids)
        routers = []
        for layer in (self.model.layers if layers is None else [self.model.layers[i] for i in layers]):
            if self.gradient_checkpointing and self.training:
                h, router = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, mask, backend, use_reentrant=False)
            else:
                h, router = layer(h, cos, sin, mask, backend)
            if router is not None:
                routers.append(router)
        return self.model.norm(h), routers

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def forward(self, input_ids, attention_mask=None, positions=None, backend=None, return_router=False):
        h, routers = self.forward_hidden(input_ids, attention_mask, positions, backend)
        logits = self.compute_logits(h)
        return (logits, routers) if return_router else logits


# ----------------------------------------------------------------------------- init
@torch.no_grad()
def init_weights(model: DeepseekV2ForCausalLM, std: float | None = None) -> None:
    """All weight initialisation, in one place.

    | parameter                                  | init                    |
    |--------------------------------------------|-------------------------|
    | embeddings, every Linear, router, experts  | normal(0, std)          |
    | RMSNorm weights                            | ones                    |
    | biases (attention_bias only)               | zeros                   |
    std defaults to config.initializer_range (0.02 released; the report trains with 0.006).
    """
    std = model.config.initializer_range if std is None else std
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, Router):
            module.weight.normal_(0.0, std)
        elif isinstance(module, Experts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)


def build_model(cfg: ModelConfig, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None, seed: int | None = None,
                std: float | None = None) -> DeepseekV2ForCausalLM:
    """A randomly initialised model, built directly on `device` in `dtype`."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg)
    if dtype is not None:
        model.to(dtype)  # on meta: free
    model.to_empty(device=device)
    model.tie_weights()
    if seed is not None:
        torch.manual_seed(seed)
    init_weights(model, std)
    return model


__all__ = ["DeepseekV2ForCausalLM", "RouterOutput", "AttentionBackend", "MLA", "Attention", "MoE", "Router",
           "Experts", "build_model", "init_weights", "apply_rope", "rope_inv_freq", "limit_to_groups"]
