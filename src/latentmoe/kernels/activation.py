"""SwiGLU's elementwise half, silu(gate) * up, in one kernel.

torch runs it as two (silu, then the product), each a full pass over [M, I] activations; at a 16K-token
prefill chunk that is ~180 MB per shared-expert layer, and at batch 1 two more launches a layer. The
kernel rounds where torch rounds (silu to the activations' dtype, then the product), so its results
equal the model's `F.silu(gate) * up` bit for bit on the GPU up to the last ulp of silu itself.
"""
import torch
import torch.nn.functional as F

from ._triton import INTERPRET, cast, jit, new_buffer, tl, triton, use_triton


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The model's formula: F.silu(gate) * up."""
    return F.silu(gate) * up


@jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, N, stride_g, stride_u, stride_o, BLOCK: tl.constexpr,
                     INTERPRETED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    a = cast(g / (1.0 + tl.exp(-g)), o_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
    tl.store(o_ptr + row * stride_o + offs, cast(a * u, o_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [..., I] of one shape and dtype -> a new [..., I]. Triton on CUDA (CPU
    under TRITON_INTERPRET=1), the reference elsewhere."""
    if not use_triton(gate) or gate.shape != up.shape or gate.dtype != up.dtype:
        return silu_mul_ref(gate, up)
    shape, N = gate.shape, gate.shape[-1]
    g2, u2 = gate.reshape(-1, N), up.reshape(-1, N)
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    out = new_buffer(g2.shape, gate.dtype, gate.device)
    if g2.shape[0]:
        block = min(1024, triton.next_power_of_2(N))
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(N, block))](g2, u2, out, N, g2.stride(0), u2.stride(0),
                                                              out.stride(0), BLOCK=block, INTERPRETED=INTERPRET,
                                                              num_warps=4)
    return out.view(shape)


__all__ = ["silu_mul", "silu_mul_ref"]
