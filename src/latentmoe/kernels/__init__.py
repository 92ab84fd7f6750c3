"""Fast kernels (Triton on CUDA) with their plain-PyTorch references, one module per op:
MLA decode and the latent-cache write, per-head (MHA baseline) decode, routed experts and their
combine, SwiGLU's silu * up, RMSNorm and MLA's post-projection, the greedy router, batched (varlen) prefill attention, GEMMs of a few rows (decode's projections, absorbed MLA's per-head products); FP8 weights (block-scaled
GEMM, routed experts) and the FP8 latent cache. The references live in `reference.py` (the FP8 ones
beside their kernels).

Each public op dispatches itself: Triton on CUDA tensors (and on CPU under TRITON_INTERPRET=1), the
torch reference elsewhere, so callers need no device checks. `poisoned_outputs()` NaN-fills kernel
outputs (for tests that catch unwritten elements).
"""
from ._triton import HAS_TRITON, compilations, poisoned_outputs
from .activation import silu_mul, silu_mul_ref
from .cache import write_latent_cache
from .fp8 import (FP8, dequantize_fp8_blocks, fp8_linear, fp8_linear_ref, quantize_fp8_blocks, quantize_fp8_groups,
                  quantize_fp8_rows)
from .fp8_cache import dequantize_latent_rows, quantize_latent_rows, write_latent_cache_fp8, write_latent_cache_fp8_ref
from .fp8_moe import fused_moe_fp8, fused_moe_fp8_ref
from .mha_decode import mha_decode, mha_decode_triton
from .mla_decode import choose_num_splits, mla_decode, mla_decode_triton
from .moe import FEW_TOKENS, few_token_layout, fused_moe, fused_moe_triton, moe_align, moe_combine, moe_combine_ref
from .norm import add_rms_norm, add_rms_norm_ref, mla_post_projection, rms_norm
from .prefill import prefill_attention, prefill_attention_triton
from .reference import (fused_moe_ref, mha_decode_ref, mla_decode_einsum, mla_decode_ref, mla_post_projection_ref,
                        prefill_attention_ref, rms_norm_ref, softmax_topk_ref, write_latent_cache_ref)
from .router import route_one_token, softmax_topk
from .skinny import (SKINNY_MAX_ROWS, per_head_matmul, per_head_matmul_ref, skinny_linear, skinny_linear_pair,
                     skinny_linear_ref, skinny_swiglu)

__all__ = [
    "HAS_TRITON", "poisoned_outputs",
    "mla_decode", "mla_decode_ref", "mla_decode_triton", "mla_decode_einsum", "choose_num_splits",
    "write_latent_cache", "write_latent_cache_ref", "mha_decode", "mha_decode_ref", "mha_decode_triton",
    "fused_moe", "fused_moe_ref", "fused_moe_triton", "moe_align", "few_token_layout", "FEW_TOKENS",
    "moe_combine", "moe_combine_ref", "silu_mul", "silu_mul_ref",
    "FP8", "quantize_fp8_blocks", "dequantize_fp8_blocks", "quantize_fp8_rows", "quantize_fp8_groups", "fp8_linear",
    "fp8_linear_ref", "fused_moe_fp8", "fused_moe_fp8_ref", "quantize_latent_rows", "dequantize_latent_rows",
    "write_latent_cache_fp8", "write_latent_cache_fp8_ref",
    "rms_norm", "rms_norm_ref", "add_rms_norm", "add_rms_norm_ref", "mla_post_projection", "mla_post_projection_ref", "softmax_topk", "softmax_topk_ref", "route_one_token",
    "prefill_attention", "prefill_attention_ref", "prefill_attention_triton",
    "skinny_linear", "skinny_linear_pair", "skinny_swiglu", "skinny_linear_ref", "SKINNY_MAX_ROWS",
    "per_head_matmul", "per_head_matmul_ref",
    "compilations",
]
