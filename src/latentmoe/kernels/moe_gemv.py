"""One token's routed experts over block-FP8 weights as row products on the CUDA cores: one program per
(assignment, column block).

At batch-1 decode each of the token's K experts is a weight read once for one row. The grouped few-token
kernels (fp8_moe.py) pad that row to a 16-row tensor-core tile and turn every e4m3 weight into bf16 for the MMA
(a conversion, a multiply by its scale and a rounding per element): in a batch-1 step on an H100 their gate_up
ran at about 1.4 TB/s of weight bytes, not bound by them. Here each program owns BLOCK_N output columns of one
assignment's expert and runs skinny.py's row product (`_rows_dot`: wide K slices, fp32 sums, a tile's scale on
x's slice, not on the tile), so nothing is padded and e4m3 is converted once.

Measured (H200, V2-Lite shape, graph replays of whole engine steps, one process, the graph sized for 128K):
FP8 weights at B=1, 1K context, 2.03 ms a step against 2.31 with the grouped kernels, 3.57 against 3.85 at 128K.
Where it loses, it is not used (`routed_gemv_applies`): two tokens (FP8 3.37 against 2.97 ms, B=2 at 1K) and
bf16 weights (2.41 against 2.32 ms at B=1, 3.44 against 3.16 at B=2), whose grouped kernel has no conversion
to save.

gate_up writes h[a] = silu(x . w_gate) * (x . w_up) (fp32, rounded once, as the grouped kernel's epilogue);
down writes y[a] = weight[a] * (h[a] . w_down) at the assignment's row, as `run_moe_gemms` leaves y_AD for
the combine. Negative expert ids (an expert-parallel rank's assignments to other ranks) leave y[a] = 0.
The reference is the grouped path's (`fused_moe_fp8_ref`): same arithmetic per assignment.
"""
import torch

from ._triton import INTERPRET, cast, jit, new_buffer, pdl_launch, tl, triton, use_triton, wait_for_inputs
from .fp8 import BLOCK
from .skinny import _rows_dot, _store_rows, choose_skinny_config


@jit(do_not_specialize=("A",))
def _gemv_gate_up_kernel(x_ptr, w_ptr, s_ptr, idx_ptr, h_ptr, A, D, I, E, stride_xm, stride_we, stride_wn,
                         stride_se, stride_sn, stride_hm, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, SCALE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr,
                         PDL: tl.constexpr):
    # Which weights to read is the router's output: nothing to load before the wait.
    wait_for_inputs(PDL)
    a = tl.program_id(1)
    n0 = tl.program_id(0) * BLOCK_N
    e = tl.load(idx_ptr + a).to(tl.int64)
    if (e >= 0) & (e < E):
        x_row = x_ptr + (a // TOP_K) * stride_xm
        w_e = w_ptr + e * stride_we
        s_e = s_ptr + e * stride_se
        g = _rows_dot(x_row, w_e, s_e, 1, I, D, stride_xm, stride_wn, 1, stride_sn, n0,
                      1, BLOCK_N, BLOCK_K, True, SCALE_BLOCK, False)
        # The up rows start at row I, a whole number of scale blocks down (`routed_gemv_applies`).
        u = _rows_dot(x_row, w_e + I * stride_wn, s_e + (I // SCALE_BLOCK) * stride_sn, 1, I, D, stride_xm,
                      stride_wn, 1, stride_sn, n0, 1, BLOCK_N, BLOCK_K, True, SCALE_BLOCK, False)
        h = g * tl.sigmoid(g) * u
        _store_rows(h_ptr + a * stride_hm, cast(h, h_ptr.dtype.element_ty, INTERPRETED), 1, I, stride_hm, n0,
                    1, BLOCK_N)


@jit(do_not_specialize=("A",))
def _gemv_down_kernel(h_ptr, w_ptr, s_ptr, idx_ptr, wt_ptr, y_ptr, A, I, D, E, stride_hm, stride_we, stride_wn,
                      stride_se, stride_sn, stride_ym, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SCALE_BLOCK: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr):
    wait_for_inputs(PDL)
    a = tl.program_id(1)
    n0 = tl.program_id(0) * BLOCK_N
    e = tl.load(idx_ptr + a).to(tl.int64)
    y = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    if (e >= 0) & (e < E):
        acc = _rows_dot(h_ptr + a * stride_hm, w_ptr + e * stride_we, s_ptr + e * stride_se, 1, D, I, stride_hm,
                        stride_wn, 1, stride_sn, n0, 1, BLOCK_N, BLOCK_K, True, SCALE_BLOCK, False)
        y = acc * tl.load(wt_ptr + a).to(tl.float32)
    _store_rows(y_ptr + a * stride_ym, cast(y, y_ptr.dtype.element_ty, INTERPRETED), 1, D, stride_ym, n0,
                1, BLOCK_N)


def routed_gemv_applies(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor | None,
                        down_proj: torch.Tensor) -> bool:
    """Whether `routed_gemv` takes these operands: Triton runs, one token, e4m3 weights with 128 x 128 block
    scales whose gate/up halves split on a block boundary (where it measured faster than the grouped kernels)."""
    E, D, I = down_proj.shape
    return (gate_up_scale is not None and x_MD.shape[0] == 1 and I % BLOCK == 0 and use_triton(x_MD)
            and x_MD.stride(-1) == 1 and gate_up_proj.is_contiguous() and down_proj.is_contiguous())


def routed_gemv(x_MD: torch.Tensor, gate_up_proj: torch.Tensor, gate_up_scale: torch.Tensor,
                down_proj: torch.Tensor, down_scale: torch.Tensor, topk_idx_MK: torch.Tensor,
                topk_weight_MK: torch.Tensor) -> torch.Tensor:
    """y_AD [M*K, D]: each (token, expert) assignment's weighted expert output at row m*K + k, for the
    combine (moe.moe_combine). x_MD [M, D]; gate_up_proj [E, 2I, D] rows [gate | up] and down_proj [E, D, I]
    in e4m3 with their [E, 2I/128, D/128] / [E, D/128, I/128] scales. (Any M is computed; the engine sends
    one token, `routed_gemv_applies`.)"""
    M, D = x_MD.shape
    E, _, I = down_proj.shape
    K = topk_idx_MK.shape[1]
    A = M * K
    idx = topk_idx_MK.reshape(-1).contiguous()
    wt = topk_weight_MK.reshape(-1).contiguous()
    h = new_buffer((A, I), x_MD.dtype, x_MD.device)
    y = new_buffer((A, D), x_MD.dtype, x_MD.device)
    c1, c2 = choose_skinny_config(1, D, True), choose_skinny_config(1, I, True)
    _gemv_gate_up_kernel[(triton.cdiv(I, c1["block_n"]), A)](
        x_MD, gate_up_proj, gate_up_scale, idx, h, A, D, I, E, x_MD.stride(0), gate_up_proj.stride(0),
        gate_up_proj.stride(1), gate_up_scale.stride(0), gate_up_scale.stride(1), h.stride(0), TOP_K=K,
        BLOCK_N=c1["block_n"], BLOCK_K=c1["block_k"], SCALE_BLOCK=BLOCK, INTERPRETED=INTERPRET,
        num_warps=c1["num_warps"], num_stages=c1["num_stages"], **pdl_launch(x_MD))
    _gemv_down_kernel[(triton.cdiv(D, c2["block_n"]), A)](
        h, down_proj, down_scale, idx, wt, y, A, I, D, E, h.stride(0), down_proj.stride(0), down_proj.stride(1),
        down_scale.stride(0), down_scale.stride(1), y.stride(0), BLOCK_N=c2["block_n"], BLOCK_K=c2["block_k"],
        SCALE_BLOCK=BLOCK, INTERPRETED=INTERPRET, num_warps=c2["num_warps"], num_stages=c2["num_stages"],
        **pdl_launch(x_MD))
    return y


__all__ = ["routed_gemv", "routed_gemv_applies"]
