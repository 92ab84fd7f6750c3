"""The training path of the fused experts (kernels.moe_autograd): forward and every gradient against
autograd through the plain-PyTorch reference, in fp64; under Triton's interpreter on CPU (a child pytest).

Inputs are random, routing is uneven (some experts get no token, some routing weights are zero as after
token dropping), and every kernel output buffer starts NaN-filled, so an unwritten element fails.
"""
import sys

import pytest
import torch
from interpreter_child import IN_CHILD, run_module_under_interpreter

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
# Same scheme as tests/test_kernels.py: the interpreter must be chosen before triton is imported.
# fp32 is exact in the interpreter; on a GPU tl.dot takes fp32 operands as tf32 (~1e-3).
FP32_TOL = 5e-3 if CUDA else 1e-5
SMALL = dict(block_m=16, block_n1=16, block_n2=16, block_k=16, num_warps=4, num_stages=2)


@pytest.mark.skipif(CUDA or IN_CHILD, reason="the interpreter child runs only on machines without CUDA")
def test_moe_backward_under_triton_interpreter():
    run_module_under_interpreter(__file__)


@pytest.fixture(scope="module")
def K(K):
    """The training kernels (kernels.moe_autograd), under conftest's poisoned outputs."""
    from latentmoe.kernels import moe_autograd
    return moe_autograd


def rel_err(out, ref):
    assert out.shape == ref.shape
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_inputs(M, TOPK, E, D, I, dtype, seed, idle=2):
    """x in `dtype`, fp32 master weights, fp32 routing weights; the last `idle` experts get no token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, D, generator=gen).to(dtype)
    gate_up = torch.randn(E, 2 * I, D, generator=gen) * D**-0.5
    down = torch.randn(E, D, I, generator=gen) * I**-0.5
    scores = torch.randn(M, E, generator=gen)
    scores[:, :2] += 2.0                          # two popular experts
    scores[:, E - idle:] = -1e4                   # never chosen
    weight, idx = scores.softmax(-1).topk(TOPK, dim=-1)
    weight[0, -1] = 0.0                           # a dropped assignment: still has a weight gradient
    dy = torch.randn(M, D, generator=gen)
    return [t.to(DEV) for t in (x, gate_up, down, idx, weight, dy)]


def run_both(K, x, gate_up, down, idx, weight, dy, config=SMALL, grads=(True, True, True, True)):
    """(output, grads) of the Triton path and of autograd through the fp64 reference."""
    leaves = [t.clone().requires_grad_(g) for t, g in zip((x, gate_up, down, weight), grads)]
    y = K.fused_moe_train(leaves[0], leaves[1], leaves[2], idx, leaves[3], config)
    y.backward(dy.to(y.dtype))
    ref_leaves = [t.detach().double().requires_grad_(g) for t, g in zip((x, gate_up, down, weight), grads)]
    y_ref = K.fused_moe_ref(ref_leaves[0], ref_leaves[1], ref_leaves[2], idx, ref_leaves[3])
    y_ref.backward(dy.double())
    return (y, [t.grad for t in leaves]), (y_ref, [t.grad for t in ref_leaves])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("M,TOPK,block_m,prefill_tiles", [(1, 2, 16, False), (29, 3, 16, False), (40, 4, 32, False),
                                                          (40, 4, 32, True)])
def test_forward_and_gradients_match_reference(K, dtype, tol, M, TOPK, block_m, prefill_tiles):
    """prefill_tiles: the forward's gate_up as one merged dot and its down tile wider than dx's, the tiles read
    as descriptor boxes in bf16 (as PREFILL_CONFIG)."""
    x, gate_up, down, idx, weight, dy = make_inputs(M, TOPK, 8, 40, 24, dtype, seed=M)
    cfg = dict(SMALL, block_m=block_m)
    if prefill_tiles:
        cfg.update(merged=True, block_n2=256, tma=True)
    (y, grads), (y_ref, ref_grads) = run_both(K, x, gate_up, down, idx, weight, dy, cfg)
    assert y.dtype == dtype and rel_err(y, y_ref) < tol
    for name, g, r in zip(("x", "gate_up_proj", "down_proj", "topk_weight"), grads, ref_grads):
        # Gradients arrive in each leaf's own dtype (autograd casts the weights' back to fp32 masters).
        assert g.dtype == {"x": dtype}.get(name, torch.float32), name
        err = rel_err(g, r)
        assert err < tol, (name, err)
    # Experts that got no token: their weight gradients are exactly zero (written, not left over).
    for g in grads[1:3]:
        assert torch.equal(g[-2:], torch.zeros_like(g[-2:]))


def test_forward_equals_inference_kernels(K):
    """The training forward runs the same GEMMs as kernels.fused_moe_triton: bit-identical outputs."""
    x, gate_up, down, idx, weight, _ = make_inputs(33, 3, 8, 40, 24, torch.bfloat16, seed=5)
    from latentmoe.kernels import fused_moe_triton
    with torch.no_grad():
        y = K.fused_moe_train(x, gate_up, down, idx, weight, SMALL)
        y_inf = fused_moe_triton(x, gate_up.to(x.dtype), down.to(x.dtype), idx, weight, SMALL)
    assert torch.equal(y, y_inf)


def test_partial_gradients_and_expanded_output_gradient(K):
    """Frozen weights (only x and the routing weight learn), and y.sum()'s stride-0 output gradient."""
    x, gate_up, down, idx, weight, _ = make_inputs(21, 3, 8, 40, 24, torch.float32, seed=7)
    dy = torch.ones(21, 40, device=DEV)
    (y, grads), (_, ref_grads) = run_both(K, x, gate_up, down, idx, weight, dy, grads=(True, False, False, True))
    assert grads[1] is None and grads[2] is None
    assert rel_err(grads[0], ref_grads[0]) < FP32_TOL and rel_err(grads[3], ref_grads[3]) < FP32_TOL
    xs = x.clone().requires_grad_()
    K.fused_moe_train(xs, gate_up, down, idx, weight, SMALL).sum().backward()
    assert rel_err(xs.grad, ref_grads[0]) < FP32_TOL


def test_default_config_and_reference_fallback(K, monkeypatch):
    """Tile sizes chosen by the dispatcher; and with Triton unusable the reference runs, still differentiable."""
    x, gate_up, down, idx, weight, dy = make_inputs(24, 2, 6, 32, 16, torch.float32, seed=11, idle=1)
    (_, grads), (_, ref_grads) = run_both(K, x, gate_up, down, idx, weight, dy, config=None)
    assert all(rel_err(g, r) < FP32_TOL for g, r in zip(grads, ref_grads))
    if not CUDA:
        monkeypatch.setattr(sys.modules["latentmoe.kernels._triton"], "INTERPRET", False)
        xs = x.clone().requires_grad_()
        K.fused_moe_train(xs, gate_up, down, idx, weight).backward(dy)
        assert torch.allclose(xs.grad, ref_grads[0].float(), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("M", [64, 4096])
def test_moe_backward_full_size(K, M):
    x, gate_up, down, idx, weight, dy = make_inputs(M, 6, 64, 2048, 1408, torch.bfloat16, seed=M, idle=4)
    (y, grads), (y_ref, ref_grads) = run_both(K, x, gate_up, down, idx, weight, dy, config=None)
    assert rel_err(y, y_ref) < 3e-2
    assert all(rel_err(g, r) < 3e-2 for g, r in zip(grads, ref_grads))
