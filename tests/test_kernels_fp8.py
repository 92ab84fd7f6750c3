"""FP8 kernels against their references: Triton's interpreter on CPU (small shapes), the GPU when present.

The scaled GEMM (both branches: fp8 weights times x's dtype, and per-token fp8 activations), the
activation quantiser, the FP8 fused-MoE kernels (sorted and few-token layouts), the FP8 latent-cache
write, and MLA decode over an FP8 cache.
"""
import pytest
import torch
from interpreter_child import IN_CHILD, run_module_under_interpreter

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.skipif(CUDA or IN_CHILD, reason="the interpreter child runs only on machines without CUDA")
def test_fp8_kernels_under_triton_interpreter():
    run_module_under_interpreter(__file__)


def rel_err(out, ref):
    assert not torch.isnan(out.float()).any(), "NaN in output (unwritten element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


SMALL = dict(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)


@pytest.mark.parametrize("M,quantize_input,bias", [(3, False, False), (37, True, True), (20, False, True)])
def test_fp8_gemm_matches_reference(K, M, quantize_input, bias):
    from latentmoe.kernels.fp8 import fp8_linear_ref, fp8_linear_triton
    g = torch.Generator().manual_seed(M)
    N, Kd = 200, 300   # neither a multiple of the 128 scale block
    w, s = K.quantize_fp8_blocks(torch.randn(N, Kd, generator=g) * 0.05)
    x = torch.randn(M, Kd, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    w, s, x = w.to(DEV), s.to(DEV), x.to(DEV)
    b = b.to(DEV) if bias else None
    out = fp8_linear_triton(x, w, s, b, config=SMALL, quantize_input=quantize_input)
    ref = fp8_linear_ref(x, w, s, b, quantize_input=quantize_input)
    # fp32 inputs: the interpreter is exact fp32, a GPU runs fp32 dots as tf32 (fp8 dots are exact products).
    assert rel_err(out, ref) < (3e-3 if CUDA else 1e-5)
    if quantize_input:   # per-token fp8 activations cost little next to the unquantised input
        assert rel_err(out, fp8_linear_ref(x, w, s, b)) < 6e-2


def test_fp8_gemm_bf16_default_path(K):
    g = torch.Generator().manual_seed(5)
    w, s = K.quantize_fp8_blocks(torch.randn(64, 256, generator=g) * 0.05)
    x = torch.randn(2, 3, 256, generator=g).to(torch.bfloat16)
    out = K.fp8_linear(x.to(DEV), w.to(DEV), s.to(DEV))
    assert out.shape == (2, 3, 64) and out.dtype == torch.bfloat16
    assert rel_err(out.cpu(), K.fp8_linear_ref(x, w, s)) < 1e-2


def test_dequantize_kernel_and_large_m_route(K):
    from latentmoe.kernels.fp8 import dequantize_fp8_blocks_triton
    g = torch.Generator().manual_seed(9)
    q, s = K.quantize_fp8_blocks(torch.randn(200, 300, generator=g))
    w = dequantize_fp8_blocks_triton(q.to(DEV), s.to(DEV), torch.float32)
    assert torch.equal(w.cpu(), K.dequantize_fp8_blocks(q, s))
    x = torch.randn(70, 300, generator=g)             # above FP8_ACTIVATION_MIN_ROWS: dequantise + GEMM
    out = K.fp8_linear(x.to(DEV), q.to(DEV), s.to(DEV))
    assert rel_err(out.cpu(), K.fp8_linear_ref(x, q, s)) < (3e-3 if CUDA else 1e-5)


@pytest.mark.parametrize("M,Kd", [(9, 300), (37, 1408)])   # one program / several, with partial groups
def test_quantize_groups_matches_reference(K, M, Kd):
    from latentmoe.kernels.fp8 import quantize_fp8_groups_ref
    g = torch.Generator().manual_seed(6)
    x = torch.randn(M, Kd, generator=g) * torch.logspace(-3, 2, Kd)   # groups of very different ranges
    q, s = K.quantize_fp8_groups(x.to(DEV))
    q_ref, s_ref = quantize_fp8_groups_ref(x)
    if not q.is_cuda:   # the interpreter divides exactly, as torch does: bit for bit
        assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().float(), q_ref.float())
        return
    # A GPU kernel's fp32 division is approximate (within an ulp): scales agree to that, and a value that
    # lands next to a rounding boundary may take the neighbouring e4m3 step (one step = 1/8 relative).
    assert torch.allclose(s.cpu(), s_ref, rtol=1e-6, atol=0)
    a, b = q.cpu().float(), q_ref.float()
    assert ((a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8 + 2.0 ** -9).all()
    assert (a != b).float().mean() < 0.01


def test_quantize_groups_outer_major_scales(K):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(21, 300, generator=g) * torch.logspace(-2, 2, 300)).to(DEV)
    q, s = K.quantize_fp8_groups(x)
    q2, s2 = K.quantize_fp8_groups(x, scale_outer_major=True)
    assert s2.shape == (21, 3) and s2.stride() == (1, 21)
    assert torch.equal(s2, s) and torch.equal(q2.float(), q.float())


@pytest.mark.parametrize("M,few", [(1, True), (2, True), (29, False)])
def test_fused_moe_fp8_matches_reference(K, M, few):
    from latentmoe.kernels.fp8_moe import fused_moe_fp8_ref, fused_moe_fp8_triton
    g = torch.Generator().manual_seed(10 + M)
    E, D, I, TOPK = 8, 256, 128, 3   # I = one scale block, so gate and up tiles stay apart
    gu, gu_s = K.quantize_fp8_blocks(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5)
    dn, dn_s = K.quantize_fp8_blocks(torch.randn(E, D, I, generator=g) * I ** -0.5)
    x = torch.randn(M, D, generator=g)
    w, idx = torch.randn(M, E, generator=g).softmax(-1).topk(TOPK, -1)
    args = [t.to(DEV) for t in (x, gu, gu_s, dn, dn_s, idx, w)]
    layout = K.few_token_layout(K.FEW_TOKENS * TOPK, DEV) if few else None
    cfg = None if few else dict(block_m=16, block_n1=32, block_n2=64, block_k=64, num_warps=4, num_stages=2)
    out = fused_moe_fp8_triton(*args, few_token_layout=layout, config=cfg)
    ref = fused_moe_fp8_ref(*[t.cpu() for t in args])
    assert rel_err(out.cpu(), ref) < (5e-3 if CUDA else 1e-5)


@pytest.mark.parametrize("E,D,I,TOPK,M,block_m,tma", [(4, 256, 128, 2, 30, 16, True), (3, 128, 256, 2, 40, 32, True),
                                                        (3, 128, 256, 2, 40, 32, False)])
def test_fused_moe_fp8_activations_matches_reference(K, E, D, I, TOPK, M, block_m, tma):
    """The fp8-activation kernels against their reference (padding rows, several K and column tiles); `tma`:
    the down GEMM reads its tiles as descriptor boxes (pointer loads otherwise)."""
    from latentmoe.kernels.fp8_moe import W8A8_CONFIG, fused_moe_fp8_w8a8_ref, fused_moe_fp8_w8a8_triton
    g = torch.Generator().manual_seed(M + I)
    gu, gu_s = K.quantize_fp8_blocks(torch.randn(E, 2 * I, D, generator=g) * 0.1)
    dn, dn_s = K.quantize_fp8_blocks(torch.randn(E, D, I, generator=g) * 0.1)
    # rows of very different size: per-token groups keep the small ones exact enough
    x = torch.randn(M, D, generator=g) * torch.logspace(-2, 1, M)[:, None]
    w, idx = torch.randn(M, E, generator=g).softmax(-1).topk(TOPK, -1)
    add = torch.randn(M, D, generator=g)
    args = [t.to(DEV) for t in (x, gu, gu_s, dn, dn_s, idx, w)]
    if tma and not CUDA:   # under the interpreter the descriptor path is the one run
        assert K._triton.tensor_descriptor(args[3], [E, D, I], [D * I, I, 1], [1, 128, 128]) is not None
    cfg = dict(W8A8_CONFIG, block_m=block_m, num_stages=2, gate_up_stages=2, tma=tma)
    out = fused_moe_fp8_w8a8_triton(*args, config=cfg, add_MD=add.to(DEV))
    cpu = [t.cpu() for t in args]
    ref = fused_moe_fp8_w8a8_ref(*cpu) + add
    # fp32 inputs: the interpreter computes exact products of the fp8 operands; h's rounding can differ
    # by one fp8 step where the two sums differ in their last bits.
    assert rel_err(out.cpu(), ref) < (1e-2 if CUDA else 1e-3)
    # the rounding of x and h costs little next to the weight-only result
    assert rel_err(out.cpu(), K.fused_moe_fp8_ref(*cpu) + add) < 6e-2


def test_fused_moe_fp8_routes_by_assignments_per_expert(K, monkeypatch):
    """fused_moe_fp8 takes the fp8-activation kernels from FP8_ACTIVATIONS_MIN_PER_EXPERT assignments per expert
    (never for the few-token layout, nor for widths that are not whole scale blocks), the weight-only kernels
    otherwise; the reference path rounds alike."""
    import latentmoe.kernels.fp8_moe as fm
    g = torch.Generator().manual_seed(4)
    E, D, TOPK = 4, 128, 2
    calls = []
    real = {n: getattr(fm, n) for n in ("fused_moe_fp8_w8a8_triton", "fused_moe_fp8_triton")}
    for n in real:
        monkeypatch.setattr(fm, n, lambda *a, _n=n, **k: calls.append(_n) or real[_n](*a, **k))
    per = fm.FP8_ACTIVATIONS_MIN_PER_EXPERT * E // TOPK     # tokens at the threshold
    for M, I, want in ((per - 1, 128, "fused_moe_fp8_triton"), (per, 128, "fused_moe_fp8_w8a8_triton"),
                       (per, 48, "fused_moe_fp8_triton")):
        gu, gu_s = K.quantize_fp8_blocks(torch.randn(E, 2 * I, D, generator=g) * 0.1)
        dn, dn_s = K.quantize_fp8_blocks(torch.randn(E, D, I, generator=g) * 0.1)
        x = torch.randn(M, D, generator=g)
        w, idx = torch.randn(M, E, generator=g).softmax(-1).topk(TOPK, -1)
        args = [t.to(DEV) for t in (x, gu, gu_s, dn, dn_s, idx, w)]
        calls.clear()
        out = K.fused_moe_fp8(*args)
        assert calls == [want]
        w8a8 = "w8a8" in want
        assert fm.uses_fp8_activations(M * TOPK, dn.shape) == w8a8
        ref = (fm.fused_moe_fp8_w8a8_ref if w8a8 else fm.fused_moe_fp8_ref)(*[t.cpu() for t in args])
        assert rel_err(out.cpu(), ref) < (1e-2 if CUDA else 1e-3)
        # the CPU reference path (no Triton) rounds the activations at the same sizes
        with monkeypatch.context() as m:
            m.setattr(fm, "use_triton", lambda t: False)
            cpu = (x, gu, gu_s, dn, dn_s, idx, w)
            assert torch.equal(K.fused_moe_fp8(*cpu), ref)
            layout = K.few_token_layout(2 * TOPK, "cpu")   # two tokens through the few-token layout: weight-only
            assert torch.equal(K.fused_moe_fp8(x[:2], *cpu[1:5], idx[:2], w[:2], few_token_layout=layout),
                               fm.fused_moe_fp8_ref(x[:2], *cpu[1:5], idx[:2], w[:2]))


def test_fused_moe_fp8_odd_expert_width(K):
    """I not a multiple of 128: the stacked [gate | up] rows share a scale tile, read the same by both."""
    g = torch.Generator().manual_seed(3)
    E, D, I, TOPK, M = 4, 64, 48, 2, 5
    gu, gu_s = K.quantize_fp8_blocks(torch.randn(E, 2 * I, D, generator=g) * 0.1)
    dn, dn_s = K.quantize_fp8_blocks(torch.randn(E, D, I, generator=g) * 0.1)
    x = torch.randn(M, D, generator=g).to(torch.bfloat16)
    w, idx = torch.randn(M, E, generator=g).softmax(-1).topk(TOPK, -1)
    args = [t.to(DEV) for t in (x, gu, gu_s, dn, dn_s, idx, w)]
    out = K.fused_moe_fp8(*args)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.cpu(), K.fused_moe_fp8_ref(*[t.cpu() for t in args])) < 1.5e-2


def test_write_latent_cache_fp8(K):
    g = torch.Generator().manual_seed(7)
    NB, page, C, R, M = 5, 16, 40, 8, 21
    cache = torch.zeros(NB, page, C + R, dtype=K.FP8)
    scale = torch.zeros(NB, page, 2)
    slots = torch.randperm(NB * page, generator=g)[:M]
    slots[[2, 9]] = -1
    c_kv = torch.randn(M, C, generator=g) * 3
    k_pe = torch.randn(M, R, generator=g) * 0.01    # a much smaller range: its own scale
    exp_cache, exp_scale = cache.clone(), scale.clone()
    K.write_latent_cache_fp8_ref(exp_cache, exp_scale, slots, c_kv, k_pe)
    cache, scale = cache.to(DEV), scale.to(DEV)
    K.write_latent_cache_fp8(cache, scale, slots.to(DEV), c_kv.to(DEV), k_pe.to(DEV))
    assert torch.equal(cache.cpu().float(), exp_cache.float()) and torch.equal(scale.cpu(), exp_scale)
    keep = slots >= 0
    rows = K.dequantize_latent_rows(exp_cache.view(-1, C + R)[slots[keep]], exp_scale.view(-1, 2)[slots[keep]],
                                    C, torch.float32)
    want = torch.cat([c_kv, k_pe], -1)[keep]
    assert ((rows - want).abs() <= want.abs() / 16 + 1e-6 + 2 ** -10 * want.abs().amax(-1, keepdim=True)).all()


@pytest.mark.parametrize("num_splits,q_size,H", [(1, 1.0, 4), (3, 1.0, 4), (2, 1e5, 4), (2, 1.0, 20)])
def test_mla_decode_fp8_cache(K, num_splits, q_size, H):
    """The FP8 cache's dots run in fp16: queries of 1e5 (past fp16's 65504) must not overflow there. 20 heads
    take the 64-head programs (44 of their rows masked)."""
    g = torch.Generator().manual_seed(8 + num_splits)
    C, R, page = 64, 16, 16
    seq_lens = [5, 40, 17]
    blocks = [(n + page - 1) // page for n in seq_lens]
    NB = sum(blocks) + 2
    rows = torch.randn(NB * page, C, generator=g)
    pe = torch.randn(NB * page, R, generator=g) * 0.1
    q_rows, q_scale = K.quantize_latent_rows(rows, pe)
    cache, scale = q_rows.view(NB, page, C + R), q_scale.view(NB, page, 2)
    perm = torch.randperm(NB, generator=g)
    table = torch.full((3, max(blocks) + 1), 2 ** 30, dtype=torch.int32)
    used = 0
    for b, nb in enumerate(blocks):
        table[b, :nb] = perm[used:used + nb].int()
        used += nb
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q_lat = (torch.randn(3, H, C, generator=g) * q_size).to(torch.bfloat16)
    q_pe = (torch.randn(3, H, R, generator=g) * q_size).to(torch.bfloat16)
    sm_scale = 0.1 / q_size
    out = K.mla_decode(q_lat.to(DEV), q_pe.to(DEV), cache.to(DEV), table.to(DEV), lens.to(DEV), sm_scale,
                       kv_scale=scale.to(DEV), num_splits=num_splits)
    ref = K.mla_decode_ref(q_lat.double(), q_pe.double(), cache, table, lens, sm_scale, kv_scale=scale)
    assert rel_err(out.cpu(), ref) < 1e-2   # probabilities (times the row scales) rounded to fp16, output to bf16
    # the reference reads the cache as its dequantised rows
    dense = K.dequantize_latent_rows(cache, scale, C, torch.float64)
    assert torch.allclose(ref, K.mla_decode_ref(q_lat.double(), q_pe.double(), dense, table, lens, sm_scale),
                          rtol=1e-5, atol=1e-6)   # (the dequantised rows are fp32 products)


# ----------------------------------------------------------------------------- full size (GPU)
@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 64, 65, 2047, 2048, 2063])
def test_fp8_gemm_full_size(K, M):
    """V2-Lite's q_proj shape in bf16, every route: the FP8 GEMM up to 64 rows, above them fp8 activations
    through torch's blockwise GEMM (FP8_SCALED_MM_MIN_ROWS), and for kv_a's 576 output rows (not whole 128-blocks)
    dequantise + GEMM. The weight's 128 x 128 tiles and x's 128-column groups span 2^-6..2^6 in scale, so a scale
    read from the wrong tile or group fails."""
    from latentmoe.kernels.fp8 import uses_fp8_dense_activations
    g = torch.Generator(device=DEV).manual_seed(M)
    tile = 2.0 ** torch.randint(-6, 7, (24, 16), device=DEV, generator=g).float()
    w_full = torch.randn(3072, 2048, device=DEV, generator=g) * 0.02
    w, s = K.quantize_fp8_blocks(w_full * tile.repeat_interleave(128, 0).repeat_interleave(128, 1))
    group = 2.0 ** torch.randint(-6, 7, (M, 16), device=DEV, generator=g).float()
    x = (torch.randn(M, 2048, device=DEV, generator=g) * group.repeat_interleave(128, 1)).to(torch.bfloat16)
    fp8_acts = uses_fp8_dense_activations(M, w.shape)
    assert fp8_acts == (M > 64)   # 65 and 2063 rows: padded to a multiple of 16 for cuBLAS
    ref = K.fp8_linear_ref(x.float(), w, s, quantize_input=fp8_acts)
    assert rel_err(K.fp8_linear(x, w, s), ref) < 1e-2
    w576, s576 = w[:576], s[:5]
    assert not uses_fp8_dense_activations(M, w576.shape)
    assert rel_err(K.fp8_linear(x, w576, s576), K.fp8_linear_ref(x.float(), w576, s576)) < 1e-2
    # the fp8-activation branch, opt-in
    from latentmoe.kernels.fp8 import fp8_linear_triton
    ref8 = K.fp8_linear_ref(x.float(), w, s, quantize_input=True)
    assert rel_err(fp8_linear_triton(x, w, s, quantize_input=True), ref8) < 1e-2


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 2, 300, 5000])
def test_fused_moe_fp8_full_size(K, M):
    g = torch.Generator(device=DEV).manual_seed(M)
    E, D, I, TOPK = 64, 2048, 1408, 6
    gu, gu_s = K.quantize_fp8_blocks(torch.randn(E, 2 * I, D, device=DEV, generator=g) * 0.02)
    dn, dn_s = K.quantize_fp8_blocks(torch.randn(E, D, I, device=DEV, generator=g) * 0.02)
    x = torch.randn(M, D, device=DEV, generator=g).to(torch.bfloat16)
    w, idx = torch.randn(M, E, device=DEV, generator=g).softmax(-1).topk(TOPK, -1)
    out = K.fused_moe_fp8(x, gu, gu_s, dn, dn_s, idx, w, few_token_layout=K.few_token_layout(2 * TOPK, DEV))
    from latentmoe.kernels import fp8_moe
    n = min(M, 64)   # the reference loops over experts in fp32: check a slice of the rows
    w8a8 = fp8_moe.uses_fp8_activations(M * TOPK, dn.shape, few_tokens=M <= K.FEW_TOKENS)
    assert w8a8 == (M >= 300)
    ref_fn = fp8_moe.fused_moe_fp8_w8a8_ref if w8a8 else K.fused_moe_fp8_ref
    ref = ref_fn(x[:n].float(), gu, gu_s, dn, dn_s, idx[:n], w[:n])
    assert rel_err(out[:n], ref) < 1.5e-2
