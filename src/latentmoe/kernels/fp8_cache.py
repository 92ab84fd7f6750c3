"""The FP8 latent cache: rows [c_kv | k_pe] in e4m3 with two fp32 scales per token (one per part).

Per token and layer the cache holds C + R bytes plus 8 bytes of scales (576 + 8 for DeepSeek-V2,
against 1,152 in bf16). A scale per token, not per tensor: c_kv is RMS-normed but k_pe is not, and
their ranges differ by orders of magnitude, so each part gets its own amax / 448. The decode kernel
(mla_decode with `kv_scale`) multiplies the scale back in registers; prefill dequantises the rows
it gathers (`dequantize_latent_rows`).
"""
import torch

from ._triton import INTERPRET, jit, tl, triton, use_triton
from .fp8 import FP8, FP8_MAX, to_fp8

_TINY = 1e-12


def quantize_latent_rows(c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c_kv [M, C], k_pe [M, R] -> (rows e4m3 [M, C+R], scales fp32 [M, 2])."""
    sc = (c_kv.float().abs().amax(-1) / FP8_MAX).clamp_min(_TINY)
    sr = (k_pe.float().abs().amax(-1) / FP8_MAX).clamp_min(_TINY)
    rows = torch.cat([c_kv.float() / sc[:, None], k_pe.float() / sr[:, None]], dim=-1)
    return rows.clamp(-FP8_MAX, FP8_MAX).to(FP8), torch.stack([sc, sr], dim=-1)


def dequantize_latent_rows(rows: torch.Tensor, scales: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """rows e4m3 [..., C+R], scales [..., 2] -> [..., C+R] in `dtype`."""
    s = torch.cat([scales[..., :1].expand(*rows.shape[:-1], C), scales[..., 1:].expand(*rows.shape[:-1],
                                                                                        rows.shape[-1] - C)], -1)
    return (rows.float() * s).to(dtype)


def write_latent_cache_fp8_ref(kv_cache: torch.Tensor, kv_scale: torch.Tensor, slot_mapping: torch.Tensor,
                               c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    keep = slot_mapping >= 0
    rows, scales = quantize_latent_rows(c_kv[keep], k_pe[keep])
    kv_cache.view(-1, kv_cache.shape[-1])[slot_mapping[keep]] = rows
    kv_scale.view(-1, 2)[slot_mapping[keep]] = scales


@jit
def _write_latent_cache_fp8_kernel(kv_ptr, s_ptr, slot_ptr, c_kv_ptr, k_pe_ptr,
                                   stride_kv_blk, stride_kv_tok, stride_s_blk, stride_s_tok, stride_c, stride_r,
                                   C: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr,
                                   BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, FP8_MAX_C: tl.constexpr,
                                   INTERPRETED: tl.constexpr):
    m = tl.program_id(0)
    slot = tl.load(slot_ptr + m)
    if slot >= 0:  # negative slots are padding tokens
        row = (slot // PAGE) * stride_kv_blk + (slot % PAGE) * stride_kv_tok
        srow = (slot // PAGE) * stride_s_blk + (slot % PAGE) * stride_s_tok
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        c = tl.load(c_kv_ptr + m * stride_c + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
        r = tl.load(k_pe_ptr + m * stride_r + offs_r, mask=offs_r < R, other=0.0).to(tl.float32)
        # Correctly rounded divisions (the GPU's default "/" is approximate): bit-equal to the reference.
        sc = tl.maximum(tl.math.div_rn(tl.max(tl.abs(c), 0), FP8_MAX_C), 1e-12)
        sr = tl.maximum(tl.math.div_rn(tl.max(tl.abs(r), 0), FP8_MAX_C), 1e-12)
        qc = tl.minimum(tl.maximum(tl.math.div_rn(c, sc), -FP8_MAX_C), FP8_MAX_C)
        qr = tl.minimum(tl.maximum(tl.math.div_rn(r, sr), -FP8_MAX_C), FP8_MAX_C)
        tl.store(kv_ptr + row + offs_c, to_fp8(qc, kv_ptr.dtype.element_ty, INTERPRETED), mask=offs_c < C)
        tl.store(kv_ptr + row + C + offs_r, to_fp8(qr, kv_ptr.dtype.element_ty, INTERPRETED), mask=offs_r < R)
        tl.store(s_ptr + srow, sc)
        tl.store(s_ptr + srow + 1, sr)


def write_latent_cache_fp8(kv_cache: torch.Tensor, kv_scale: torch.Tensor, slot_mapping: torch.Tensor,
                           c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
    """kv_cache e4m3 [NB,BS,C+R] and kv_scale fp32 [NB,BS,2] at `slot_mapping` [M] (< 0 skips) <- the
    quantised [c_kv | k_pe] rows (c_kv [M,C], k_pe [M,R]). Triton where it runs, the reference elsewhere."""
    M, C = c_kv.shape
    R = k_pe.shape[-1]
    assert kv_cache.dtype == FP8 and kv_cache.shape[-1] == C + R and kv_cache.stride(-1) == 1
    assert kv_scale.shape == (*kv_cache.shape[:2], 2) and kv_scale.stride(-1) == 1
    if M == 0:
        return
    if not use_triton(kv_cache):
        write_latent_cache_fp8_ref(kv_cache, kv_scale, slot_mapping, c_kv, k_pe)
        return
    c_kv = c_kv if c_kv.stride(-1) == 1 else c_kv.contiguous()
    k_pe = k_pe if k_pe.stride(-1) == 1 else k_pe.contiguous()
    _write_latent_cache_fp8_kernel[(M,)](
        kv_cache, kv_scale, slot_mapping.contiguous(), c_kv, k_pe, kv_cache.stride(0), kv_cache.stride(1),
        kv_scale.stride(0), kv_scale.stride(1), c_kv.stride(0), k_pe.stride(0),
        C=C, R=R, PAGE=kv_cache.shape[1], BLOCK_C=triton.next_power_of_2(C), BLOCK_R=triton.next_power_of_2(R),
        FP8_MAX_C=FP8_MAX, INTERPRETED=INTERPRET, num_warps=1)


__all__ = ["quantize_latent_rows", "dequantize_latent_rows", "write_latent_cache_fp8", "write_latent_cache_fp8_ref"]
