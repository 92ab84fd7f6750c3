"""Fast kernels (Triton on CUDA) with their plain-PyTorch references: MLA decode, cache write, routed experts.

Each public function dispatches itself: Triton on CUDA tensors (and on CPU under TRITON_INTERPRET=1),
the torch reference elsewhere, so callers need no device checks.
"""
from ._triton import HAS_TRITON
from .cache import write_latent_cache
from .mla_decode import choose_num_splits, mla_decode, mla_decode_triton
from .moe import fused_moe, fused_moe_triton, moe_align
from .reference import fused_moe_ref, mla_decode_einsum, mla_decode_ref, write_latent_cache_ref

__all__ = [
    "HAS_TRITON", "mla_decode", "mla_decode_ref", "mla_decode_triton", "mla_decode_einsum", "choose_num_splits",
    "write_latent_cache", "write_latent_cache_ref", "fused_moe", "fused_moe_ref", "fused_moe_triton", "moe_align",
]
