"""The engine's own module tree: the caller's parameters, the kernels' forwards.

The engine never changes a model it is handed. When its runner is built it makes a structural copy
(`engine_model`): new module objects holding the same Parameter objects (no weight is copied; a
device/dtype change converts each tensor once), with the modules that have a fused forward built as
the subclasses below. Their forwards call `latentmoe.kernels` entries, which run Triton where it can
run and the torch references elsewhere. Parameter names, and so state_dict keys, are the model's.

Why fused forwards at all: a decode step at small batch is bound by the number of kernels, not by
bytes (the model's RMSNorm is ~7 elementwise kernels, each RoPE ~9, the fp32 router ~6 after its
GEMM, the expert sort ~12), and a long prefill by the passes its elementwise steps make over the
activations (the residual add before a norm, silu then the product, the expert sum then its cast
then the shared experts' add: one pass each here). Inference only: the kernels have no backward.

With quantization="fp8" the Linears and routed experts are built as Fp8Linear / Fp8Experts holding new
block-FP8 tensors (kernels/fp8.py says why 128 x 128 blocks): the one place weights are not shared.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig
from ..model import MLA, MLP, Block, MoE, Experts, RouterOutput, Router, RMSNorm


def _weight_of(linear: nn.Module):
    """(weight, scale_inv or None) of a bias-free Linear the few-row kernels can read; None for other modules
    (a tensor-parallel shard, a Linear with a bias)."""
    if type(linear) in (nn.Linear, EngineLinear) and linear.bias is None:
        return linear.weight, None
    if type(linear) is Fp8Linear and linear.bias is None:
        return linear.weight, linear.weight_scale_inv
    return None


class EngineLinear(nn.Linear):
    """A Linear whose decode-sized inputs (up to kernels.SKINNY_MAX_ROWS rows) take the few-row GEMM, which
    reads the weight at close to the memory's speed where cuBLAS's tiles do not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            y = kernels.skinny_linear(x, self.weight)
            if y is not None:
                return y
        return F.linear(x, self.weight, self.bias)


class EngineRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class EngineBlock(Block):
    """The decoder block with the attention's residual add and the next norm in one kernel (kernels.add_rms_norm),
    and, where the MoE layer is the engine's, both handed to it (EngineMoE's `add_norm`: at one token they run in
    the router's launch) and the MoE's residual add in the experts' combine."""

    def forward(self, h, cos, sin, mask=None, backend=None):
        if type(self.self_attn) is EngineMLA and type(self.input_layernorm) in (RMSNorm, EngineRMSNorm):
            a = self.self_attn(h, cos, sin, mask, backend, norm=self.input_layernorm)
        else:
            a = self.self_attn(self.input_layernorm(h), cos, sin, mask, backend)
        norm = self.post_attention_layernorm
        if type(self.mlp) is EngineMoE:
            return self.mlp(a, residual=h, add_norm=norm)
        h, x = kernels.add_rms_norm(h, a, norm.weight, norm.eps)
        if self.is_moe:
            out, router = self.mlp(x)
            return h + out, router
        return h + self.mlp(x), None


class EngineMLA(MLA):
    """MLA whose projections end in one fused kernel: the c_KV norm and both RoPEs (kernels.mla_post_projection),
    which also stores the new latent rows in the engine's cache where its backend offers the cache
    (`write_target`); at decode sizes the two projections of x (q or q_a, and kv_a) are one few-row launch,
    which also applies the block's input norm when given one (`norm`: x is then the un-normalised stream)."""

    def forward(self, x, cos, sin, mask=None, backend=None, norm=None):
        target = backend.write_target(self) if backend is not None and hasattr(backend, "write_target") else None
        if target is None:
            return super().forward(x if norm is None else norm(x), cos, sin, mask, backend)
        rows = backend.absorb_rows(self)
        q_nope, q_pe, c_kv, k_pe, *q_lat = self.project(x, cos, sin, target, norm, absorb_rows=rows)
        o = backend.attend(self, q_nope, q_pe, c_kv, k_pe, written=True, q_lat=q_lat[0] if q_lat else None)
        return self.o_proj(o.flatten(2))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_target=None, norm=None,
                absorb_rows: int = 0):
        """The model's project; `cache_target` (kv_cache, slot_mapping): the new latent rows stored there too;
        `norm` (an RMSNorm): applied to x first (inside the few-row kernel where it runs). `absorb_rows` > 0:
        also q_lat [rows, H, C] = W_UK^T q_nope of the first rows (flattened), from the post-projection's
        launch where it can (kernels.mla_post_projection), as a fifth result."""
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        first = self.q_proj if self.q_lora_rank is None else self.q_a_proj
        q, kv = self._first_projections(x2, first, norm)
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        half = cos.shape[-1]   # cos/sin may broadcast over the batch: one row per token for the kernel
        cos2 = cos.expand(B, T, half).reshape(-1, half).float().contiguous()
        sin2 = sin.expand(B, T, half).reshape(-1, half).float().contiguous()
        norm = self.kv_a_layernorm
        q_nope, q_pe, c_kv, k_pe, *q_lat = kernels.mla_post_projection(
            q.contiguous(), kv.contiguous(), norm.weight, norm.eps, cos2, sin2, self.n_heads,
            *(cache_target or (None, None)), w_uk=self.w_uk if absorb_rows else None, absorb_rows=absorb_rows)
        return (q_nope.view(B, T, *q_nope.shape[1:]), q_pe.view(B, T, *q_pe.shape[1:]),
                c_kv.view(B, T, -1), k_pe.view(B, T, -1), *q_lat)

    def _first_projections(self, x2: torch.Tensor, first: nn.Module, norm=None):
        """(first(n), kv_a_proj_with_mqa(n)), n = norm(x2) or x2: one few-row launch for both (and the norm)
        at decode sizes."""
        a, b = _weight_of(first), _weight_of(self.kv_a_proj_with_mqa)
        if a is not None and b is not None:
            both = kernels.skinny_linear_pair(x2, *a, *b, norm=None if norm is None else (norm.weight, norm.eps))
            if both is not None:
                return both
        if norm is not None:
            x2 = norm(x2)
        return first(x2), self.kv_a_proj_with_mqa(x2)


class EngineRouter(Router):
    """Greedy routing: fp32 logits (one GEMM) + softmax/top-K/weights in one kernel, both in one launch for a
    single token (kernels.route_one_token). Only built for routers without group or device limits (those keep
    the model's forward)."""

    def prepare(self, cfg: ModelConfig) -> None:
        self._weight_fp32 = None   # (key, fp32 weight)
        # route_one_token's program count (its own per layer); built here, before any CUDA-graph capture.
        self._done = torch.zeros(1, dtype=torch.int32, device=self.weight.device)

    def weight_fp32(self) -> torch.Tensor:
        """The weight in fp32, converted once (again if the parameter is changed in place or replaced)."""
        w = self.weight
        key = (w.data_ptr(), None if w.is_inference() else w._version)   # inference tensors carry no version
        if self._weight_fp32 is None or self._weight_fp32[0] != key:
            self._weight_fp32 = (key, w.detach().float().contiguous())
        return self._weight_fp32[1]

    def route_add_norm(self, h: torch.Tensor, delta: torch.Tensor, norm: nn.Module):
        """(scores, topk_weight, topk_idx, h + delta, norm(h + delta)) for one token in one launch
        (kernels.route_one_token), or None where that does not apply (route_one_token checks the operands; the
        row count is checked first so that a prefill's rows are not reshaped only to be refused)."""
        if h.numel() != h.shape[-1]:
            return None
        return kernels.route_one_token(h.reshape(1, -1), self.weight, self._done, self.top_k, self.norm_topk_prob,
                                       self.routed_scaling_factor,
                                       add_norm=(delta.reshape(1, -1), norm.weight, norm.eps))

    def forward(self, x: torch.Tensor):
        w, x2 = self.weight, x.reshape(-1, x.shape[-1])
        logits = None
        if w.dtype == x.dtype:
            routed = kernels.route_one_token(x2, w, self._done, self.top_k, self.norm_topk_prob,
                                             self.routed_scaling_factor)
            if routed is not None:
                return routed
            # At decode sizes the few-row kernel, summing the exact products in fp32 (cuBLAS took 4.9 us here in
            # a batch-1 step on an H200, for a 256 KB weight).
            logits = kernels.skinny_linear(x2, w, out_dtype=torch.float32)
            if logits is None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
                # 16-bit products are exact in fp32, so a GEMM accumulating and writing fp32 is the fp32 GEMM up
                # to summation order, without the fp32 copies of x and the weight (at 8K tokens the fp32 GEMM
                # alone took 59 us a layer on an H200, the copy of x besides).
                logits = torch.mm(x2, w.t(), out_dtype=torch.float32)
        if logits is None:
            logits = F.linear(x2.float(), self.weight_fp32()).contiguous()
        return kernels.softmax_topk(logits, self.top_k, self.norm_topk_prob, self.routed_scaling_factor)


class EngineMLP(MLP):
    """SwiGLU with silu(gate) * up in one kernel (the dense layers and the shared experts); at decode sizes the
    gate and up GEMMs and that product are one few-row launch.

    Under FP8 the gate and up weights are the two halves of one e4m3 tensor (`gate_up_fp8`, set by engine_model
    where the hidden width is whole 128-row blocks), so more rows than the few-row kernel takes run one GEMM of
    twice the width, quantising x once, instead of two. H100, V2-Lite shape, FP8 engine decode steps at 1K context
    (one process, engines alternating, two rounds): B=64 9.67 against 10.11-10.12 ms, B=128 10.27-10.28 against
    10.56-10.58, B=256 12.11-12.13 against 12.38-12.41 (bf16 13.08 / 14.11 / 15.81)."""

    gate_up_fp8: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = _weight_of(self.gate_proj), _weight_of(self.up_proj)
        h = kernels.skinny_swiglu(x, *g, *u) if g is not None and u is not None else None
        if h is None and self.gate_up_fp8 is not None:
            gu = kernels.fp8_linear(x, *self.gate_up_fp8)
            half = gu.shape[-1] // 2
            h = kernels.silu_mul(gu[..., :half], gu[..., half:])
        if h is None:
            h = kernels.silu_mul(self.gate_proj(x), self.up_proj(x))
        return self.down_proj(h)


class EngineMoE(MoE):
    """The MoE layer with the shared experts' output, and the block's residual stream when given, added in the
    routed experts' final pass (their combine) instead of separate adds. Only built where the experts are the
    engine's (they take `add_MD` and `residual_MD`); never under expert parallelism, whose all-reduce follows.

    On CUDA, up to SIDE_STREAM_MAX_TOKENS tokens (decode), the shared experts run on a second stream beside
    the router and the routed experts, joining at the combine (a CUDA graph keeps both branches): at batch 1
    each of these kernels reads its weights at 2-3 TB/s, not the memory's 4.8, so two at once overlap.
    Measured on an H200 at V2-Lite's shape, 1K context, graph replays: 2.38 ms a step against 2.62 without
    (batch 1), 4.64 against 5.11 (batch 4). Again on an H100 (engines one after another in one process): bf16
    2.82 / 3.87 / 5.58 ms against 3.00 / 4.23 / 6.06 without at batch 1 / 2 / 4; FP8 weights 2.34 / 3.28 / 4.24
    against 2.42 / 3.67 / 4.74. Running the shared experts instead as extra experts of the routed
    kernel (weight 1, one launch for all) measured slower: H100, V2-Lite's shape, 6 layers in one graph, per
    layer 63.0 us against 57.3 with the side stream and 70.5 with both on one stream (routed alone 55.4); at 2
    tokens 106.7 against 95.0. Asking for the shared experts' weights to be brought into L2 (a bulk prefetch on
    the side stream while the attention runs) also measured slower: H100, same engines, bf16 2.88 / 3.99 / 5.69 ms
    against 2.83 / 3.86 / 5.57 without at batch 1 / 2 / 4, so it was not kept."""

    SIDE_STREAM_MAX_TOKENS = 16

    def prepare(self, cfg: ModelConfig) -> None:
        # One side stream per device, shared by the layers (they run one after another); built here, before
        # any CUDA-graph capture.
        dev = next(self.parameters()).device
        self._side = _side_stream(dev) if dev.type == "cuda" and self.shared_experts is not None else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, add_norm: nn.Module | None = None):
        """`add_norm` (the block's RMSNorm): x is the attention's output and `residual` the stream before it;
        the layer's input is add_norm(residual + x), and the stream it adds to is residual + x (formed with the
        routing in one launch at one token: EngineRouter.route_add_norm)."""
        shape = x.shape
        routed = None
        if add_norm is not None:
            if type(self.gate) is EngineRouter:
                routed = self.gate.route_add_norm(residual, x, add_norm)
            if routed is None:
                residual, x = kernels.add_rms_norm(residual, x, add_norm.weight, add_norm.eps)
            else:
                residual, x = routed[3].view(shape), routed[4].view(shape)
        x_MD = x.reshape(-1, shape[-1])
        side = getattr(self, "_side", None) if 0 < x_MD.shape[0] <= self.SIDE_STREAM_MAX_TOKENS else None
        shared = ready = None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                shared = self.shared_experts(x_MD)
                ready = torch.cuda.Event()
                ready.record(side)
            shared.record_stream(torch.cuda.current_stream(x.device))   # read on this stream: not reused early
        scores, topk_weight, topk_idx = self.gate(x_MD) if routed is None else routed[:3]
        if side is None and self.shared_experts is not None:
            shared = self.shared_experts(x_MD)
        res = residual.reshape(x_MD.shape) if residual is not None else None
        y = self.experts(x_MD, topk_idx, topk_weight, add_MD=shared, residual_MD=res, add_ready=ready)
        return y.view(shape), RouterOutput(scores, topk_idx, topk_weight, None)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class EngineExperts(Experts):
    """Routed experts through kernels.fused_moe; batch-1/2 decodes skip the expert sort (2 kernels, not ~14).
    Negative expert ids are skipped (an expert-parallel rank's assignments to other ranks' experts)."""

    skip_negative = False   # set on the experts of an expert-parallel rank (engine/tensor_parallel.py)

    def prepare(self, cfg: ModelConfig) -> None:
        # Built here, before any CUDA-graph capture; an attribute, not a buffer (state_dict unchanged).
        self.few_token_layout = kernels.few_token_layout(kernels.FEW_TOKENS * cfg.num_experts_per_tok,
                                                         self.gate_up_proj.device)

    def forward(self, x_MD: torch.Tensor, topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor,
                add_MD: torch.Tensor | None = None, residual_MD: torch.Tensor | None = None,
                add_ready=None) -> torch.Tensor:
        return kernels.fused_moe(x_MD, self.gate_up_proj, self.down_proj, topk_idx_MK, topk_weight_MK,
                                 few_token_layout=self.few_token_layout, skip_negative=self.skip_negative,
                                 add_MD=add_MD, residual_MD=residual_MD, add_ready=add_ready)


class Fp8Linear(nn.Module):
    """A Linear with block-FP8 weights: `weight` e4m3 [N, K], `weight_scale_inv` [N/128, K/128] fp32 (the
    names DeepSeek's FP8 checkpoints use), run by kernels.fp8_linear. Inference only."""

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(weight_scale_inv, requires_grad=False)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            y = kernels.skinny_linear(x, self.weight, self.weight_scale_inv)
            if y is not None:
                return y
        return kernels.fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)


class Fp8Experts(Experts):
    """Routed experts with block-FP8 weights (gate_up_proj / down_proj e4m3 and their `_scale_inv`), run by
    kernels.fused_moe_fp8; batch-1/2 decodes skip the expert sort as EngineExperts does."""

    def __init__(self, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor],
                 impl: str = "auto"):
        nn.Module.__init__(self)
        self.n_experts = gate_up[0].shape[0]
        self.impl = impl
        self.gate_up_proj = nn.Parameter(gate_up[0], requires_grad=False)
        self.gate_up_proj_scale_inv = nn.Parameter(gate_up[1], requires_grad=False)
        self.down_proj = nn.Parameter(down[0], requires_grad=False)
        self.down_proj_scale_inv = nn.Parameter(down[1], requires_grad=False)

    prepare = EngineExperts.prepare

    def forward(self, x_MD: torch.Tensor, topk_idx_MK: torch.Tensor, topk_weight_MK: torch.Tensor,
                add_MD: torch.Tensor | None = None, residual_MD: torch.Tensor | None = None,
                add_ready=None) -> torch.Tensor:
        return kernels.fused_moe_fp8(x_MD, self.gate_up_proj, self.gate_up_proj_scale_inv, self.down_proj,
                                     self.down_proj_scale_inv, topk_idx_MK, topk_weight_MK,
                                     few_token_layout=self.few_token_layout, add_MD=add_MD,
                                     residual_MD=residual_MD, add_ready=add_ready)


# Linears that stay in the compute dtype under FP8: the output head (as in DeepSeek's FP8 releases) and
# kv_b_proj, whose weight absorbed decode reads directly as W_UK / W_UV (the released FP8 kv_b_proj is
# dequantised on load).
FP8_SKIP = ("lm_head", "kv_b_proj")


def fp8_quantizable(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    """Whether the engine stores `module` (called `name` in the model) in block FP8."""
    if type(module) is nn.Linear:
        return name.rsplit(".", 1)[-1] not in FP8_SKIP
    return type(module) is Experts and type(parent) is MoE


def _fp8_pair(name: str, weight: torch.Tensor, stored: dict, device: torch.device | None):
    """(e4m3 weight, scale_inv) for the tensor `name`: as a block-FP8 checkpoint stored it, else quantised now."""
    target = device or weight.device
    if name in stored:
        q, s = stored[name]
        return q.to(target), s.to(target, torch.float32)
    return kernels.quantize_fp8_blocks(weight.detach().to(target))


def _fp8_gate_up(name: str, mlp: nn.Module, stored: dict, device: torch.device | None):
    """One block-FP8 pair [2H, D] for an MLP's gate and up weights (gate rows first), or None where they are not
    two bias-free Linears of one shape whose H is whole 128-row blocks (so no scale block spans both halves, and
    each half's pair is exactly what quantising it alone gives)."""
    g, u = mlp.gate_proj, mlp.up_proj
    if not (type(g) is nn.Linear and type(u) is nn.Linear and g.bias is None and u.bias is None
            and g.weight.shape == u.weight.shape and g.weight.shape[0] % kernels.fp8.BLOCK == 0
            and fp8_quantizable(f"{name}.gate_proj", g, mlp) and fp8_quantizable(f"{name}.up_proj", u, mlp)):
        return None
    (qg, sg), (qu, su) = (_fp8_pair(f"{name}.{k}.weight", lin.weight, stored, device)
                          for k, lin in (("gate_proj", g), ("up_proj", u)))
    return torch.cat([qg, qu]), torch.cat([sg, su])


def _engine_class(module: nn.Module, parent: nn.Module | None, fused_ops: bool, fused_experts: bool,
                  quantized: bool = False) -> type:
    """The class the engine builds `module` as: an engine subclass where one applies, else its own."""
    kind = type(module)
    if fused_ops and kind is nn.Linear:
        return EngineLinear
    if fused_ops and kind is RMSNorm:
        return EngineRMSNorm
    if fused_ops and kind is MLA:
        return EngineMLA
    if fused_ops and kind is Router and module.n_group == 1 and module.device_limit is None:
        return EngineRouter
    if fused_ops and kind is MLP:
        return EngineMLP
    if fused_ops and kind is Block and type(module.post_attention_layernorm) is RMSNorm:
        return EngineBlock
    # An MoE layer whose routed experts will be the engine's (EngineExperts or Fp8Experts: they take add_MD).
    if kind is MoE and (fused_experts or quantized):
        return EngineMoE
    # An MoE layer's experts (also a rank's share of them inside tensor_parallel.ParallelMoE).
    if fused_experts and kind is Experts and isinstance(parent, MoE):
        return EngineExperts
    return kind


def _on(t: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` itself when it already has the device and (floating tensors) the dtype, else a converted copy."""
    want_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
    same_device = device is None or (t.device.type == device.type and device.index in (None, t.device.index))
    if same_device and t.dtype == want_dtype:
        return t
    moved = t.detach().to(device=device, dtype=want_dtype)
    return nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved


def engine_model(model: nn.Module, *, fused_ops: bool = False, fused_experts: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 quantization: str | None = None, fp8_weights: dict | None = None) -> nn.Module:
    """The engine's copy of `model` in eval mode: same parameters (the same objects unless `device`/`dtype`
    ask for a conversion; tied weights stay tied), the engine subclasses above where `fused_ops`
    (Linear, RMSNorm, the block's residual add with its norm, MLA post-projection, greedy router, SwiGLU) and `fused_experts` (routed experts, and the MoE
    layer adding the shared experts in their combine) choose them.
    `model` itself is not touched. For inference only (the fused kernels have no backward).

    quantization="fp8": every Linear but those in FP8_SKIP becomes an Fp8Linear and the routed experts
    Fp8Experts, holding new e4m3 tensors quantised from the model's weights in 128 x 128 blocks, or the
    pairs of `fp8_weights` ({model tensor name: (e4m3, scale_inv)}, as checkpoint.read_fp8_weights
    returns them from a block-FP8 checkpoint) where it has them. An EngineMLP's gate and up weights are then
    the halves of one such tensor (EngineMLP says why), each half exactly what quantising it alone gives.
    """
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization must be None or 'fp8', got {quantization!r}")
    stored = fp8_weights or {}
    tensors: dict[int, torch.Tensor] = {}

    def share(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if id(t) not in tensors:
            tensors[id(t)] = _on(t, device, dtype)
        return tensors[id(t)]

    def rebuild(module: nn.Module, parent: nn.Module | None, name: str = "") -> nn.Module:
        if quantization == "fp8" and fp8_quantizable(name, module, parent):
            if type(module) is nn.Linear:
                return Fp8Linear(*_fp8_pair(f"{name}.weight", module.weight, stored, device), share(module.bias))
            return Fp8Experts(_fp8_pair(f"{name}.gate_up_proj", module.gate_up_proj, stored, device),
                              _fp8_pair(f"{name}.down_proj", module.down_proj, stored, device), module.impl)
        cls = _engine_class(module, parent, fused_ops, fused_experts, quantization == "fp8")
        new = cls.__new__(cls)
        merged = _fp8_gate_up(name, module, stored, device) if quantization == "fp8" and cls is EngineMLP else None
        halves = {}
        if merged is not None:
            # gate_proj and up_proj hold views of the halves: one copy of the weights, two ways to read them.
            (q, s), n = merged, module.gate_proj.out_features
            halves = {"gate_proj": Fp8Linear(q[:n], s[:n // kernels.fp8.BLOCK], None),
                      "up_proj": Fp8Linear(q[n:], s[n // kernels.fp8.BLOCK:], None)}
        # Attributes by reference; containers (hooks, buffer-name sets, ...) as the copy's own.
        new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set, list)) else v
                             for k, v in module.__dict__.items()})
        new._parameters = {k: share(p) for k, p in module._parameters.items()}
        new._buffers = {k: share(b) for k, b in module._buffers.items()}
        new._modules = {k: halves[k] if k in halves else None if c is None else
                        rebuild(c, module, f"{name}.{k}" if name else k) for k, c in module._modules.items()}
        if merged is not None:
            new.gate_up_fp8 = merged
        return new

    new_model = rebuild(model, None).eval()
    cfg = model.config
    for m in new_model.modules():
        if isinstance(m, (EngineRouter, EngineExperts, Fp8Experts, EngineMoE)):
            m.prepare(cfg)
    return new_model


__all__ = ["engine_model", "EngineLinear", "EngineRMSNorm", "EngineBlock", "EngineMLA", "EngineRouter", "EngineMLP", "EngineMoE", "EngineExperts",
           "Fp8Linear", "Fp8Experts", "FP8_SKIP", "fp8_quantizable"]
