"""Store the new tokens' latent rows into the paged cache: kv_cache[slot] = [c_kv | k_pe] (Triton, in place)."""
import torch

from ._triton import jit, pdl_launch, tl, triton, use_triton, wait_for_inputs
from .reference import write_latent_cache_ref


@jit
def _write_latent_cache_kernel(kv_ptr, slot_ptr, c_kv_ptr, k_pe_ptr,
                               stride_kv_blk, stride_kv_tok, stride_c, stride_r,
                               C: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr,
                               BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    m = tl.program_id(0)
    slot = tl.load(slot_ptr + m)
    if slot >= 0:  # negative slots are padding tokens (e.g. a CUDA-graph batch filled up)
        row = (slot // PAGE) * stride_kv_blk + (slot % PAGE) * stride_kv_tok
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        c = tl.load(c_kv_ptr + m * stride_c + offs_c, mask=offs_c < C)
        tl.store(kv_ptr + row + offs_c, c.to(kv_ptr.dtype.element_ty), mask=offs_c < C)
        r = tl.load(k_pe_ptr + m * stride_r + offs_r, mask=offs_r < R)
        tl.store(kv_ptr + row + C + offs_r, r.to(kv_ptr.dtype.element_ty), mask=offs_r < R)


def write_latent_cache(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, c_kv: torch.Tensor,
                       k_pe: torch.Tensor) -> None:
    """kv_cache [NB,BS,C+R], slot_mapping [M] (block * BS + offset; < 0 skips), c_kv [M,C], k_pe [M,R]."""
    M, C = c_kv.shape
    R = k_pe.shape[-1]
    assert kv_cache.shape[-1] == C + R and kv_cache.stride(-1) == 1
    if M == 0:
        return
    if not use_triton(kv_cache):
        write_latent_cache_ref(kv_cache, slot_mapping, c_kv, k_pe)
        return
    c_kv = c_kv if c_kv.stride(-1) == 1 else c_kv.contiguous()
    k_pe = k_pe if k_pe.stride(-1) == 1 else k_pe.contiguous()
    slot_mapping = slot_mapping.contiguous()
    _write_latent_cache_kernel[(M,)](
        kv_cache, slot_mapping, c_kv, k_pe, kv_cache.stride(0), kv_cache.stride(1), c_kv.stride(0), k_pe.stride(0),
        C=C, R=R, PAGE=kv_cache.shape[1], BLOCK_C=triton.next_power_of_2(C), BLOCK_R=triton.next_power_of_2(R),
        num_warps=1, **pdl_launch(kv_cache))
