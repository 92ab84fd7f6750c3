"""Kernels against their plain-PyTorch references: Triton's interpreter on CPU (small shapes), the GPU at full size.

Every check draws random inputs, shuffled block tables with junk in unused entries, ragged lengths,
and NaN-filled output buffers, so an unwritten or misaddressed element fails the comparison.
"""
import sys

import pytest
import torch
from interpreter_child import IN_CHILD, run_module_under_interpreter

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
# Without CUDA the kernel tests run in a child pytest under Triton's interpreter (interpreter_child).


@pytest.mark.skipif(CUDA or IN_CHILD, reason="the interpreter child runs only on machines without CUDA")
def test_kernels_under_triton_interpreter():
    run_module_under_interpreter(__file__)


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_paged_cache(seq_lens, page, C, R, dtype, gen, extra_blocks=3):
    """A cache holding the sequences in shuffled, non-contiguous blocks; block-table padding is junk."""
    blocks_per_seq = [(n + page - 1) // page for n in seq_lens]
    MB = max(blocks_per_seq) + 2
    NB = sum(blocks_per_seq) + extra_blocks
    kv_cache = torch.randn(NB, page, C + R, generator=gen).to(dtype)
    perm = torch.randperm(NB, generator=gen)
    block_table = torch.full((len(seq_lens), MB), 2**30, dtype=torch.int32)  # never read
    used = 0
    for b, nb in enumerate(blocks_per_seq):
        block_table[b, :nb] = perm[used:used + nb].int()
        used += nb
    return kv_cache.to(DEV), block_table.to(DEV), torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


def check_mla(K, seq_lens, H, C, R, page, dtype, scale=0.3, seed=0, **tuning):
    gen = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    kv_cache, block_table, lens = make_paged_cache(seq_lens, page, C, R, dtype, gen)
    q_lat = torch.randn(B, H, C, generator=gen).to(dtype).to(DEV)
    q_pe = torch.randn(B, H, R, generator=gen).to(dtype).to(DEV)
    ref = K.mla_decode_ref(q_lat.double(), q_pe.double(), kv_cache.double(), block_table, lens, scale)
    out = K.mla_decode_triton(q_lat, q_pe, kv_cache, block_table, lens, scale, **tuning)
    assert out.dtype == dtype and out.shape == (B, H, C)
    err = rel_err(out, ref)
    assert err < 1e-2, (err, seq_lens, H, C, R, page, dtype, tuning)
    return err


# ----------------------------------------------------------------------------- MLA decode, small shapes
@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_mla_decode_paged_ragged(K, page, num_splits):
    check_mla(K, [1, 70, 129, 33], H=4, C=32, R=16, page=page, dtype=torch.bfloat16, num_splits=num_splits)


@pytest.mark.parametrize("H,block_h", [(16, 16), (20, 16), (40, 32)])
def test_mla_decode_head_groups(K, H, block_h):
    # H not a multiple of BLOCK_H: the last head group is partly masked.
    check_mla(K, [50, 9], H=H, C=32, R=16, page=16, dtype=torch.bfloat16, block_h=block_h, num_splits=2)


def test_mla_decode_merges_wide_latents_in_column_blocks(K):
    # A latent over several of the merge's 32-column programs (the last block partly masked), pieces in use
    # differing by sequence, and tiles that straddle cache blocks (page 16, 32-token tiles).
    check_mla(K, [3, 200, 64], H=2, C=280, R=16, page=16, dtype=torch.bfloat16, num_splits=4, block_n=32)


def test_mla_decode_merge_widens_its_column_blocks_when_rows_are_many(K):
    """32 (sequence, head) rows: the merge doubles its 32 columns while the rows alone give every (nominal)
    multiprocessor four programs, up to one 512-column block (C = 280, partly masked), reading 19 pieces in
    chunks of 16 (8K values in registers). End to end against the reference, and the same partials merged
    with 32-column blocks (the narrow path the other tests check) must agree."""
    check_mla(K, [600, 3, 64, 250, 1, 33, 512, 97], H=4, C=280, R=16, page=16, dtype=torch.bfloat16,
              num_splits=32, block_n=16)
    from latentmoe.kernels.mla_decode import merge_splits
    gen = torch.Generator().manual_seed(3)
    B, H, S, X = 8, 4, 32, 280
    o_part = torch.randn(B, H, S, X, generator=gen).to(DEV)
    lse = torch.randn(B, H, S, generator=gen).to(DEV)
    lens = torch.tensor([600, 3, 64, 250, 1, 33, 512, 97], dtype=torch.int32, device=DEV)
    narrow, wide = (torch.full((B, H, X), float("nan"), device=DEV) for _ in range(2))
    merge_splits(o_part, lse, narrow, lens, 16, block_x=32)
    merge_splits(o_part, lse, wide, lens, 16, block_x=512)
    assert torch.isfinite(wide).all() and rel_err(wide, narrow) < 1e-6


def test_mla_decode_fp16_odd_widths_and_many_splits(K):
    # C, R not powers of two; more pieces than some sequences have tiles (empty pieces must weigh 0).
    check_mla(K, [5, 100], H=3, C=40, R=24, page=32, dtype=torch.float16, num_splits=8, block_n=16)


def test_mla_decode_uses_only_the_pieces_a_sequence_fills(K):
    """A graph's piece count is sized for its longest context: a long sequence fills 19 of 32 pieces (the merge
    walks them in chunks of 8), short ones fill one; the pieces left unwritten (NaN under the kernel tests'
    poisoned buffers) must not reach the result, whatever the merge reads."""
    check_mla(K, [300, 5, 1, 17], H=4, C=32, R=16, page=16, dtype=torch.bfloat16, num_splits=32, block_n=16)


def test_mla_decode_dispatch_handles_narrow_rope(K):
    """R = 8 is below tl.dot's minimum width on a GPU: the dispatcher must still answer correctly."""
    gen = torch.Generator().manual_seed(9)
    kv_cache, block_table, lens = make_paged_cache([30, 7], 16, 32, 8, torch.float32, gen)
    q_lat = torch.randn(2, 4, 32, generator=gen).to(DEV)
    q_pe = torch.randn(2, 4, 8, generator=gen).to(DEV)
    ref = K.mla_decode_ref(q_lat.double(), q_pe.double(), kv_cache.double(), block_table, lens, 0.3)
    assert rel_err(K.mla_decode(q_lat, q_pe, kv_cache, block_table, lens, 0.3), ref) < 3e-3


def test_mla_decode_fp32_is_tight(K):
    err = check_mla(K, [77, 3], H=4, C=32, R=16, page=16, dtype=torch.float32, num_splits=2)
    # Exact fp32 products in the interpreter; on a GPU tl.dot takes fp32 operands as tf32 (~1e-3).
    assert err < (3e-3 if CUDA else 1e-5)


def test_mla_decode_matches_dense_attention(K):
    """The paged reference itself against plain causal attention written differently (MQA over the rows)."""
    gen = torch.Generator().manual_seed(5)
    kv_cache, block_table, lens = make_paged_cache([45], 16, 32, 16, torch.float64, gen)
    q_lat = torch.randn(1, 4, 32, generator=gen, dtype=torch.float64).to(DEV)
    q_pe = torch.randn(1, 4, 16, generator=gen, dtype=torch.float64).to(DEV)
    rows = torch.stack([kv_cache[block_table[0, t // 16], t % 16] for t in range(45)])  # [S, C+R]
    q = torch.cat([q_lat, q_pe], dim=-1)[:, :, None]                                     # [1, H, 1, C+R]
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, rows[None, None], rows[None, None, :, :32], scale=0.3)[:, :, 0]
    assert rel_err(K.mla_decode_ref(q_lat, q_pe, kv_cache, block_table, lens, 0.3), dense) < 1e-12


def test_choose_num_splits(K):
    # CPU: nominal 8 multiprocessors, 16 program slots at 2 each; 1.4 programs each (11.2) reach the
    # bandwidth with 1,152-byte rows, so a piece's 64 KB of partials costs 65,536 / (11.2 * 1,152) = 5.08
    # tokens' time and the merge 100 more.
    cpu = torch.device("cpu")
    # Below one wave: fill it. 1 x 4,096: 16 pieces = one wave of 256 + 64 tokens, under the bandwidth
    # floor of 4,096 / 11.2 = 366, + merge 100 + 16 x 5.08 = 547; 8 pieces 576 + 141; 32 pieces 366 + 263.
    assert K.choose_num_splits(batch=1, head_groups=1, max_seq_len=4096, device=cpu) == 16
    # 3 sequences: 4 pieces = one wave of 1,088 -> floor 1,097 + 161 = 1,258; 8 = 2 waves of 576
    # (1,152 + 222); 16 = 3 waves of 320 (floor 1,097 + 344): no more pieces than the bandwidth uses.
    assert K.choose_num_splits(batch=3, head_groups=1, max_seq_len=4096, device=cpu) == 4
    # 6 programs on 8 slots: 1 piece = one wave of 4,160 with 2 slots idle; 4 pieces = 3 waves of 1,088
    # = 3,264 + 222 of merge: all slots busy, faster.
    assert K.choose_num_splits(batch=3, head_groups=2, max_seq_len=4096, device=cpu, ctas_per_sm=1) == 4
    # 64 programs fill 16 slots in exactly 4 waves: splitting only adds overhead.
    assert K.choose_num_splits(batch=64, head_groups=1, max_seq_len=4096, device=cpu) == 1
    # 12 programs, one wave of 4,160, are already past the bandwidth (floor 4,389): 1 piece; waves alone
    # (3 waves of 1,088 with 4 pieces) would have cut them, for nothing but a merge.
    assert K.choose_num_splits(batch=12, head_groups=1, max_seq_len=4096, device=cpu) == 1
    # 20 programs: 1 piece = 2 waves, the second 4/16 busy (8,320); 2 pieces = 3 waves of 2,112 = 6,336,
    # under the floor of 7,314, + 303 of merge; 4 pieces reach the same floor with a dearer merge (506).
    assert K.choose_num_splits(batch=20, head_groups=1, max_seq_len=4096, device=cpu) == 2
    # Pieces of at least 32 tokens: 4 of 200 (1 x (50 + 64) + 120 of merge) beat 1 of 200 (264).
    assert K.choose_num_splits(batch=1, head_groups=1, max_seq_len=200, device=cpu) == 4
    assert K.choose_num_splits(batch=1, head_groups=1, max_seq_len=40, device=cpu) == 1
    # Half the bytes a row (FP8): twice the programs before the bandwidth binds, so 12 sequences split.
    assert K.choose_num_splits(batch=12, head_groups=1, max_seq_len=4096, device=cpu, row_bytes=576) == 4


def test_dispatch_without_triton_uses_the_references(K, monkeypatch):
    """CPU tensors with the interpreter off take the torch references (what the engine gets on CPU)."""
    monkeypatch.setattr(sys.modules["latentmoe.kernels._triton"], "INTERPRET", False)
    gen = torch.Generator().manual_seed(7)
    kv_cache, block_table, lens = make_paged_cache([20, 3], 16, 32, 16, torch.float32, gen)
    kv_cache, block_table, lens = kv_cache.cpu(), block_table.cpu(), lens.cpu()
    q_lat, q_pe = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 4, 16, generator=gen)
    assert torch.equal(K.mla_decode(q_lat, q_pe, kv_cache, block_table, lens, 0.3),
                       K.mla_decode_ref(q_lat, q_pe, kv_cache, block_table, lens, 0.3))
    x, gate_up, down, idx, weight = [t.cpu() for t in make_moe(5, 2, 4, 16, 8, torch.float32, gen)]
    assert torch.equal(K.fused_moe(x, gate_up, down, idx, weight), K.fused_moe_ref(x, gate_up, down, idx, weight))


# ----------------------------------------------------------------------------- cache write
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_latent_cache(K, dtype):
    gen = torch.Generator().manual_seed(1)
    NB, page, C, R, M = 7, 16, 40, 8, 30
    kv_cache = torch.randn(NB, page, C + R, generator=gen).to(dtype).to(DEV)
    slots = torch.randperm(NB * page, generator=gen)[:M]
    slots[[3, 11]] = -1  # padding tokens: nothing written
    slots = slots.to(DEV)
    c_kv = torch.randn(M, C, generator=gen).to(dtype).to(DEV)
    k_pe = torch.randn(M, 2 * R, generator=gen).to(dtype).to(DEV)[:, ::2]  # a strided view of rows
    k_pe = k_pe.contiguous()
    expected = kv_cache.clone()
    K.write_latent_cache_ref(expected, slots, c_kv, k_pe)
    K.write_latent_cache(kv_cache, slots, c_kv, k_pe)
    assert torch.equal(kv_cache, expected)
    # and the reference does what it says
    rows = expected.view(-1, C + R)
    keep = slots >= 0
    assert torch.equal(rows[slots[keep]], torch.cat([c_kv, k_pe], -1)[keep])


# ----------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("M,TOPK,E,bm", [(23, 3, 10, 4), (1, 6, 64, 16), (300, 6, 64, 16), (97, 6, 160, 16),
                                         (40, 2, 8, 128), (1500, 6, 64, 64)])
@pytest.mark.parametrize("parallel_count", [False, True])
def test_moe_align(K, M, TOPK, E, bm, parallel_count):
    from latentmoe.kernels.moe import moe_align_torch
    gen = torch.Generator().manual_seed(2 + M)
    scores = torch.rand(M, E, generator=gen)
    scores[:, : E // 3] += 1.0  # uneven loads: some experts crowded, some empty
    idx = scores.topk(TOPK, dim=-1).indices.to(DEV)
    sorted_ids, block_expert = K.moe_align(idx, E, bm, parallel_count=parallel_count)
    A = M * TOPK
    ids = sorted_ids.cpu().view(-1, bm)
    be = block_expert.cpu()
    real = ids[ids < A]
    assert sorted(real.tolist()) == list(range(A))  # every assignment exactly once
    assert ((ids >= 0) & (ids <= A)).all() and ((be >= 0) & (be <= E)).all()  # all written
    flat = idx.flatten().cpu()
    for blk in range(ids.shape[0]):
        rows = ids[blk][ids[blk] < A]
        if be[blk] < E:
            assert len(rows) > 0 and (flat[rows.long()] == be[blk]).all()
            assert (rows.diff() > 0).all()  # assignment order within an expert
        else:
            assert len(rows) == 0
    assert (be.diff() >= 0).all()
    # The Triton kernel (on a GPU or under the interpreter) and the torch ops give the same layout.
    ref_ids, ref_be = moe_align_torch(idx, E, bm)
    assert torch.equal(sorted_ids.cpu(), ref_ids.cpu()) and torch.equal(block_expert.cpu(), ref_be.cpu())


def make_moe(M, TOPK, E, D, I, dtype, gen, skew=False):
    x = torch.randn(M, D, generator=gen).to(dtype)
    gate_up = (torch.randn(E, 2 * I, D, generator=gen) * D**-0.5).to(dtype)
    down = (torch.randn(E, D, I, generator=gen) * I**-0.5).to(dtype)
    scores = torch.randn(M, E, generator=gen)
    if skew:  # most tokens pick the same experts, others get none
        scores[:, :TOPK] += 4.0
    weight, idx = scores.softmax(-1).topk(TOPK, dim=-1)
    return [t.to(DEV) for t in (x, gate_up, down, idx, weight)]


@pytest.mark.parametrize("M,skew,block_m,merged,tma", [(1, False, 16, False, False), (37, False, 16, False, False),
                                                      (40, True, 32, False, False), (37, False, 16, True, False),
                                                      (40, True, 32, True, False), (37, False, 16, True, True),
                                                      (40, True, 32, True, True)])
def test_fused_moe(K, M, skew, block_m, merged, tma):
    """merged: gate and up as one dot over 2 x 32 columns (I = 48: the second tile is half masked).
    tma: weight tiles (and down's h tiles) read as descriptor boxes; the gate_up box is [1, 2, 32, 32] of the
    weights viewed [E, 2, I, D], so the second column tile reaches past I and must read zeros there."""
    gen = torch.Generator().manual_seed(3 + M)
    x, gate_up, down, idx, weight = make_moe(M, 3, 8, 64, 48, torch.bfloat16, gen, skew)
    cfg = dict(block_m=block_m, block_n1=32, block_n2=32, block_k=32, num_warps=4, num_stages=2, merged=merged,
               tma=tma)
    h = torch.empty(64, 48, dtype=x.dtype, device=DEV)
    assert (K.moe._descriptors(gate_up, down, h, cfg) is not None) == tma   # the path under test is the one run
    out = K.fused_moe_triton(x, gate_up, down, idx, weight, cfg)
    ref = K.fused_moe_ref(x.double(), gate_up.double(), down.double(), idx, weight)
    assert out.dtype == x.dtype
    assert rel_err(out, ref) < 1.5e-2  # two bf16 roundings: the SwiGLU activations and each expert's output


@pytest.mark.parametrize("M", [2, 37])
def test_fused_moe_skips_negative_ids(K, M):
    """An expert-parallel rank's call: other ranks' assignments (id -1) add nothing, on the few-token and
    the sorted layouts; the expected value is the reference over the kept assignments alone."""
    gen = torch.Generator().manual_seed(11 + M)
    x, gate_up, down, idx, weight = make_moe(M, 3, 8, 64, 48, torch.float32, gen)
    foreign = torch.rand(idx.shape, generator=gen).to(DEV) < 0.6
    foreign[0] = True   # a token with no local assignment at all
    foreign[1, 0] = False   # and one with at least one
    skipped = torch.where(foreign, -1, idx)
    expected = K.fused_moe_ref(x, gate_up, down, torch.where(foreign, 0, idx), torch.where(foreign, 0.0, weight))
    layout = K.few_token_layout(K.FEW_TOKENS * 3, DEV)
    out = K.fused_moe(x, gate_up, down, skipped, weight, few_token_layout=layout, skip_negative=True)
    assert out[0].abs().max() == 0
    assert rel_err(out, expected) < (5e-3 if CUDA else 1e-5)


@pytest.mark.parametrize("M,top_k,D,dtype", [(1, 6, 48, torch.bfloat16), (13, 3, 1500, torch.bfloat16),
                                             (5, 2, 40, torch.float32)])
def test_moe_combine_equals_sum_then_shared_add(K, M, top_k, D, dtype):
    """The combine kernel against the model's order of operations: the K rows summed in fp32 and rounded,
    then the shared experts' output added in the activations' dtype (bit for bit), then the block's residual
    stream (`h + moe(x)` in the model), and without adds."""
    gen = torch.Generator().manual_seed(M + D)
    y = torch.randn(M * top_k, D, generator=gen).to(dtype).to(DEV)
    shared = torch.randn(M, 2 * D, generator=gen).to(dtype).to(DEV)[:, :D]   # strided rows, as a view may come
    h = (torch.randn(M, D, generator=gen) * 8).to(dtype).to(DEV)
    expected = y.view(M, top_k, D).sum(1, dtype=torch.float32).to(dtype)
    assert torch.equal(K.moe_combine_ref(y, top_k, shared), expected + shared)
    assert torch.equal(K.moe_combine(y, top_k), expected)
    assert torch.equal(K.moe_combine(y, top_k, shared), expected + shared)
    assert torch.equal(K.moe_combine_ref(y, top_k, shared, h), h + (expected + shared))
    assert torch.equal(K.moe_combine(y, top_k, shared, h), h + (expected + shared))
    assert torch.equal(K.moe_combine(y, top_k, None, h), h + expected)


@pytest.mark.parametrize("shape,dtype", [((3, 40), torch.float32), ((2, 5, 1408), torch.bfloat16)])
def test_silu_mul_matches_the_model_formula(K, shape, dtype):
    gen = torch.Generator().manual_seed(len(shape))
    g = (torch.randn(*shape, generator=gen) * 4).to(dtype).to(DEV)
    u = torch.randn(*shape, generator=gen).to(dtype).to(DEV)
    out = K.silu_mul(g, u)
    ref = torch.nn.functional.silu(g) * u
    assert out.shape == ref.shape and out.dtype == dtype
    # Rounded where torch rounds (silu, then the product): equal but for last-ulp differences in silu's exp.
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 4e-3)
    if dtype == torch.bfloat16:
        assert (out != ref).float().mean() < 0.02


@pytest.mark.parametrize("M", [2, 37])
def test_fused_moe_adds_the_shared_output(K, M):
    gen = torch.Generator().manual_seed(5 + M)
    x, gate_up, down, idx, weight = make_moe(M, 3, 8, 64, 48, torch.bfloat16, gen)
    shared = torch.randn(M, 64, generator=gen).to(torch.bfloat16).to(DEV)
    layout = K.few_token_layout(K.FEW_TOKENS * 3, DEV)
    plain = K.fused_moe(x, gate_up, down, idx, weight, few_token_layout=layout)
    both = K.fused_moe(x, gate_up, down, idx, weight, few_token_layout=layout, add_MD=shared)
    assert torch.equal(both, plain + shared)


def test_fused_moe_reference_matches_model_experts(K):
    """fused_moe_ref against the model's own Experts module (per-expert loop), in fp64."""
    from latentmoe.config import get_config
    from latentmoe.model import Experts
    cfg = get_config("tiny")
    experts = Experts(cfg).double()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        experts.gate_up_proj.normal_(generator=gen)
        experts.down_proj.normal_(generator=gen)
    M = 9
    x = torch.randn(M, cfg.hidden_size, generator=gen, dtype=torch.float64)
    weight, idx = torch.randn(M, cfg.n_routed_experts, generator=gen).softmax(-1).topk(cfg.num_experts_per_tok, -1)
    experts.impl = "loop"
    with torch.no_grad():
        expected = experts(x, idx, weight.double())
        got = K.fused_moe_ref(x, experts.gate_up_proj, experts.down_proj, idx, weight.double())
    assert rel_err(got, expected) < 1e-6  # the model scales by the routing weight in fp32


def test_poisoned_outputs_is_scoped(K):
    from latentmoe.kernels._triton import new_buffer
    assert new_buffer((3,), torch.float32, torch.device("cpu")).isnan().all()   # inside the fixture's block
    import contextvars
    outside = contextvars.Context()   # a fresh context: no poisoning there
    assert not outside.run(lambda: new_buffer((64,), torch.int32, torch.device("cpu")).eq(-1).all())


@pytest.mark.parametrize("M", [1, 2])
def test_few_token_experts_match_reference(K, M):
    g = torch.Generator().manual_seed(M)
    E, D, I, TOPK = 8, 32, 48, 3
    x = torch.randn(M, D, generator=g).to(DEV)
    w1 = (torch.randn(E, 2 * I, D, generator=g) * 0.2).to(DEV)
    w2 = (torch.randn(E, D, I, generator=g) * 0.2).to(DEV)
    idx = torch.stack([torch.randperm(E, generator=g)[:TOPK] for _ in range(M)]).to(DEV)
    if M == 2:
        idx[1, 0] = idx[0, 1]   # two tokens sharing an expert
    w = torch.rand(M, TOPK, generator=g).to(DEV)
    layout = K.few_token_layout(K.FEW_TOKENS * TOPK, DEV)   # built for 2 tokens, serving 1 or 2
    out = K.fused_moe(x, w1, w2, idx, w, few_token_layout=layout)
    # fp32 tl.dot runs as tf32 on a GPU; the interpreter is exact fp32.
    assert rel_err(out, K.fused_moe_ref(x, w1, w2, idx, w)) < (5e-3 if CUDA else 1e-5)
    assert torch.equal(out, K.fused_moe(x, w1, w2, idx, w, few_token_layout=layout))   # deterministic


# ----------------------------------------------------------------------------- per-head (MHA) decode
def make_per_head_cache(seq_lens, page, H, DK, DV, dtype, gen):
    kv, block_table, lens = make_paged_cache(seq_lens, page, H * DK, H * DV, dtype, gen)
    k = kv[..., :H * DK].reshape(*kv.shape[:2], H, DK).contiguous()
    v = kv[..., H * DK:].reshape(*kv.shape[:2], H, DV).contiguous()
    return k, v, block_table, lens


@pytest.mark.parametrize("num_splits,block_n", [(1, 4), (2, 4), (5, 4), (None, 16)])
def test_mha_decode_paged_ragged(K, num_splits, block_n):
    gen = torch.Generator().manual_seed(11)
    k, v, block_table, lens = make_per_head_cache([13, 9, 1], 4, 3, 40, 24, torch.float32, gen)
    q = torch.randn(3, 3, 40, generator=gen).to(DEV)
    ref = K.mha_decode_ref(q.double(), k.double(), v.double(), block_table, lens, 0.25)
    out = K.mha_decode_triton(q, k, v, block_table, lens, 0.25, num_splits=num_splits, block_n=block_n)
    assert rel_err(out, ref) < (3e-3 if CUDA else 1e-5)
    assert torch.equal(K.mha_decode(q, k, v, block_table, lens, 0.25, num_splits=num_splits, block_n=block_n), out)


# ----------------------------------------------------------------------------- norm, RoPE, router
@pytest.mark.parametrize("N,dtype", [(48, torch.float32), (1024, torch.bfloat16)])
def test_rms_norm(K, N, dtype):
    gen = torch.Generator().manual_seed(N)
    x = (torch.randn(2, 5, N, generator=gen) * 3).to(dtype).to(DEV)
    w = torch.randn(N, generator=gen).to(dtype).to(DEV)
    out = K.rms_norm(x, w, 1e-6)
    ref = K.rms_norm_ref(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == ref.dtype
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    # the reference is the model's RMSNorm
    from latentmoe.model import RMSNorm
    norm = RMSNorm(N, 1e-6).to(dtype).to(DEV)
    norm.weight.data.copy_(w)
    with torch.no_grad():
        assert torch.equal(norm(x), ref)


@pytest.mark.parametrize("N,dtype", [(48, torch.float32), (1024, torch.bfloat16)])
def test_add_rms_norm(K, N, dtype):
    """The residual add then the norm: the sum exactly h + delta in h's dtype, the norm as rms_norm's."""
    gen = torch.Generator().manual_seed(N)
    h = (torch.randn(2, 3, N, generator=gen) * 3).to(dtype).to(DEV)
    d = torch.randn(2, 3, N, generator=gen).to(dtype).to(DEV)
    w = (1 + 0.1 * torch.randn(N, generator=gen)).to(dtype).to(DEV)
    s, y = K.add_rms_norm(h, d, w, 1e-6)
    assert torch.equal(s, h + d)
    assert rel_err(y, K.rms_norm_ref((h + d).double(), w.double(), 1e-6)) < (1e-6 if dtype == torch.float32 else 8e-3)
    assert torch.equal(y, K.rms_norm(h + d, w, 1e-6))   # the same row code as the plain norm


@pytest.mark.parametrize("H,N,C,R,q_rows", [(4, 8, 32, 16, 5), (3, 12, 40, 8, 1)])
def test_mla_post_projection(K, H, N, C, R, q_rows):
    from latentmoe.model import apply_rope
    gen = torch.Generator().manual_seed(H * C)
    q = torch.randn(q_rows, H * (N + R), generator=gen).to(DEV)
    kv = torch.randn(q_rows, C + R, generator=gen).to(DEV)
    w = torch.randn(C, generator=gen).to(DEV)
    angle = torch.rand(q_rows, R // 2, generator=gen).to(DEV) * 6
    cos, sin = angle.cos().contiguous(), angle.sin().contiguous()
    ref = K.mla_post_projection_ref(q.clone(), kv.clone(), w, 1e-6, cos, sin, H)
    out = K.mla_post_projection(q.clone(), kv.clone(), w, 1e-6, cos, sin, H)
    for a, b in zip(out, ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6
    # the reference rotates as the model does
    q3 = q.view(q_rows, H, N + R)
    assert torch.equal(ref[1], apply_rope(q3[..., N:], cos[:, None], sin[:, None]))
    assert torch.equal(ref[3], apply_rope(kv[:, C:], cos, sin))


@pytest.mark.parametrize("absorb_rows,M", [(1, 1), (2, 5), (3, 4)])
def test_mla_post_projection_absorbs_w_uk(K, absorb_rows, M):
    """With W_UK: the same four outputs, and q_lat = W_UK^T q_nope of the first rows (computed by the same
    launch at one or two rows, by per_head_matmul after it at three), W_UK read as the strided view of
    kv_b_proj's weight the engine passes."""
    H, N, V, C, R = 3, 16, 12, 40, 8
    gen = torch.Generator().manual_seed(M)
    q = torch.randn(M, H * (N + R), generator=gen).to(torch.bfloat16).to(DEV)
    kv = torch.randn(M, C + R, generator=gen).to(torch.bfloat16).to(DEV)
    w = (1 + 0.1 * torch.randn(C, generator=gen)).to(torch.bfloat16).to(DEV)
    angle = torch.rand(M, R // 2, generator=gen).to(DEV) * 6
    cos, sin = angle.cos().contiguous(), angle.sin().contiguous()
    kv_b = (torch.randn(H * (N + V), C, generator=gen) / C ** 0.5).to(torch.bfloat16).to(DEV)
    w_uk = kv_b.view(H, N + V, C)[:, :N]
    plain = K.mla_post_projection(q.clone(), kv.clone(), w, 1e-6, cos, sin, H)
    out = K.mla_post_projection(q.clone(), kv.clone(), w, 1e-6, cos, sin, H, w_uk=w_uk, absorb_rows=absorb_rows)
    assert len(out) == 5
    for a, b in zip(out[:4], plain):
        assert torch.equal(a, b)
    assert out[4].shape == (absorb_rows, H, N)[:2] + (C,)
    ref = K.per_head_matmul_ref(plain[0][:absorb_rows].double(), w_uk.double())
    assert rel_err(out[4], ref) < 1e-2
    assert torch.equal(out[4], K.per_head_matmul(plain[0][:absorb_rows], w_uk))   # the same kernel's arithmetic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_post_projection_writes_the_cache(K, dtype):
    """With a cache and slots: the same outputs, and the cache rows write_latent_cache stores from them
    (padding slots skipped, other rows untouched)."""
    H, N, C, R, M, page = 3, 8, 40, 16, 6, 4
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(M, H * (N + R), generator=gen).to(dtype).to(DEV)
    kv = torch.randn(M, C + R, generator=gen).to(dtype).to(DEV)
    w = (1 + 0.1 * torch.randn(C, generator=gen)).to(dtype).to(DEV)
    angle = torch.rand(M, R // 2, generator=gen).to(DEV) * 6
    cos, sin = angle.cos().contiguous(), angle.sin().contiguous()
    before = torch.randn(5, page, C + R, generator=gen).to(dtype).to(DEV)
    slots = torch.tensor([7, 0, -1, 19, 12, -1], device=DEV)
    cache = before.clone()
    out = K.mla_post_projection(q.clone(), kv.clone(), w, 1e-6, cos, sin, H, kv_cache=cache, slot_mapping=slots)
    plain = K.mla_post_projection(q.clone(), kv.clone(), w, 1e-6, cos, sin, H)
    for a, b in zip(out, plain):
        assert torch.equal(a, b)
    expected = before.clone()
    K.write_latent_cache_ref(expected, slots, plain[2], plain[3])
    assert torch.equal(cache, expected)
    assert torch.equal(cache.view(-1, C + R)[1:7], before.view(-1, C + R)[1:7])


@pytest.mark.parametrize("E,top_k,norm,scale", [(8, 2, True, 1.0), (64, 6, False, 2.5), (10, 1, True, 16.0)])
def test_softmax_topk(K, E, top_k, norm, scale):
    gen = torch.Generator().manual_seed(E + top_k)
    logits = (torch.randn(7, E, generator=gen) * 2).to(DEV)
    scores, w, idx = K.softmax_topk(logits, top_k, norm, scale)
    ref_s, ref_w, ref_i = K.softmax_topk_ref(logits, top_k, norm, scale)
    assert idx.dtype == torch.int64 and torch.equal(idx, ref_i)   # both in descending order
    assert rel_err(scores, ref_s) < 1e-6 and rel_err(w, ref_w) < 1e-6
    if norm and top_k > 1:
        assert torch.allclose(w.sum(-1), torch.ones(7, device=DEV))


# ----------------------------------------------------------------------------- full size, GPU only
@gpu
@needs_cuda
@pytest.mark.parametrize("H,page,dtype", [(16, 16, torch.bfloat16), (16, 64, torch.bfloat16), (16, 128, torch.bfloat16),
                                          (128, 16, torch.bfloat16), (128, 64, torch.bfloat16),
                                          (128, 128, torch.bfloat16), (16, 64, torch.float16), (128, 64, torch.float16)])
def test_mla_decode_full_size(K, H, page, dtype):
    gen = torch.Generator().manual_seed(H + page)
    lens = torch.randint(1, 3000, (12,), generator=gen).tolist() + [1, 4096]
    check_mla(K, lens, H=H, C=512, R=64, page=page, dtype=dtype, scale=0.1147)
    if page == 64:
        check_mla(K, lens[:3], H=H, C=512, R=64, page=page, dtype=dtype, scale=0.1147, num_splits=1)


@gpu
@needs_cuda
def test_write_latent_cache_full_size(K):
    kv = torch.randn(100, 64, 576, device=DEV, dtype=torch.bfloat16)
    slots = torch.randperm(6400, device=DEV)[:1000]
    c_kv = torch.randn(1000, 512, device=DEV, dtype=torch.bfloat16)
    k_pe = torch.randn(1000, 64, device=DEV, dtype=torch.bfloat16)
    expected = kv.clone()
    K.write_latent_cache_ref(expected, slots, c_kv, k_pe)
    K.write_latent_cache(kv, slots, c_kv, k_pe)
    assert torch.equal(kv, expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 64, 4096])
def test_fused_moe_full_size(K, M):
    gen = torch.Generator().manual_seed(M)
    x, gate_up, down, idx, weight = make_moe(M, 6, 64, 2048, 1408, torch.bfloat16, gen)
    out = K.fused_moe(x, gate_up, down, idx, weight)
    ref = K.fused_moe_ref(x.float(), gate_up.float(), down.float(), idx, weight)
    assert rel_err(out, ref) < 1.5e-2


@gpu
@needs_cuda
def test_mha_decode_full_size(K):
    gen = torch.Generator().manual_seed(3)
    lens = [1, 37, 500, 16, 999]
    k, v, block_table, sl = make_per_head_cache(lens, 16, 16, 192, 128, torch.float32, gen)
    q = torch.randn(len(lens), 16, 192, generator=gen).to(DEV)
    ref = K.mha_decode_ref(q.double(), k.double(), v.double(), block_table, sl, 0.07)
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 2e-2)):   # fp32 runs as tf32 on the GPU
        for splits in (1, 3, None):
            out = K.mha_decode_triton(q.to(dtype), k.to(dtype), v.to(dtype), block_table, sl, 0.07, num_splits=splits)
            assert rel_err(out, ref) < tol, (dtype, splits)


@pytest.mark.parametrize("E,top_k,norm,scale,D", [(64, 6, False, 1.0, 96), (10, 3, True, 1.0, 40), (16, 2, False, 2.5, 64)])
def test_route_one_token_matches_gemm_then_rule(K, E, top_k, norm, scale, D):
    """One token's logits GEMM and routing rule in one launch: the same scores, weights and experts as the
    few-row GEMM's fp32 logits through softmax_topk, launch after launch (the program count it keeps in `done`
    is back at 0 after each), and None where it does not apply (two rows)."""
    from latentmoe.kernels.skinny import skinny_linear
    gen = torch.Generator().manual_seed(E * D)
    w = torch.randn(E, D, generator=gen).to(torch.bfloat16).to(DEV)
    done = torch.zeros(1, dtype=torch.int32, device=DEV)
    for i in range(3):
        x = torch.randn(1, D, generator=gen).to(torch.bfloat16).to(DEV)
        scores, topw, topi = K.route_one_token(x, w, done, top_k, norm, scale)
        ref_s, ref_w, ref_i = K.softmax_topk(skinny_linear(x, w, out_dtype=torch.float32), top_k, norm, scale)
        assert torch.equal(topi, ref_i) and torch.equal(scores, ref_s) and torch.equal(topw, ref_w)
        assert done.item() == 0
    assert K.route_one_token(torch.randn(2, D).to(torch.bfloat16).to(DEV), w, done, top_k, norm, scale) is None


@pytest.mark.parametrize("E,top_k,norm,D", [(64, 6, False, 96), (10, 3, True, 40)])
def test_route_one_token_adds_and_norms_first(K, E, top_k, norm, D):
    """With add_norm the launch also forms the block's residual add and norm: the stream and the normed row as
    add_rms_norm returns them (bit for bit), and the routing of that row as the plain path routes it."""
    from latentmoe.kernels.skinny import skinny_linear
    gen = torch.Generator().manual_seed(D)
    w = torch.randn(E, D, generator=gen).to(torch.bfloat16).to(DEV)
    nw = (1 + 0.1 * torch.randn(D, generator=gen)).to(torch.bfloat16).to(DEV)
    done = torch.zeros(1, dtype=torch.int32, device=DEV)
    for i in range(2):
        h = (torch.randn(1, D, generator=gen) * 3).to(torch.bfloat16).to(DEV)
        d = torch.randn(1, D, generator=gen).to(torch.bfloat16).to(DEV)
        scores, topw, topi, s, x = K.route_one_token(h, w, done, top_k, norm, 1.0, add_norm=(d, nw, 1e-6))
        ref_s, ref_x = K.add_rms_norm(h, d, nw, 1e-6)
        assert torch.equal(s, ref_s) and torch.equal(x, ref_x)
        r_s, r_w, r_i = K.softmax_topk(skinny_linear(ref_x, w, out_dtype=torch.float32), top_k, norm, 1.0)
        assert torch.equal(topi, r_i) and torch.allclose(scores, r_s, atol=1e-6) and torch.allclose(topw, r_w, atol=1e-6)
        assert done.item() == 0


# ---- few-row GEMMs (kernels/skinny.py) ----

SKINNY_SHAPES = [(1, 200, 300), (3, 64, 520), (4, 9, 130)]   # N, K not multiples of the tiles; K < one tile


@pytest.mark.parametrize("M,N,Kd", SKINNY_SHAPES)
@pytest.mark.parametrize("fp8", [False, True])
def test_skinny_linear_matches_reference(K, M, N, Kd, fp8):
    from latentmoe.kernels.skinny import choose_skinny_config, skinny_linear, skinny_linear_ref
    g = torch.Generator().manual_seed(M * N + Kd)
    dtype = torch.float32 if not CUDA else torch.bfloat16
    w = torch.randn(N, Kd, generator=g) * 0.05
    w, s = K.quantize_fp8_blocks(w) if fp8 else (w.to(dtype), None)
    x = torch.randn(M, Kd, generator=g).to(dtype)
    w, x = w.to(DEV), x.to(DEV)
    s = s.to(DEV) if fp8 else None
    for config in (None, dict(choose_skinny_config(M, Kd, fp8), block_k=64)):   # one K slice, several
        out = skinny_linear(x, w, s, config=config, max_rows=4)
        ref = skinny_linear_ref(x, w, s)
        assert out.shape == (M, N) and out.dtype == dtype
        assert rel_err(out.float(), ref.float()) < (1e-2 if CUDA else 1e-6)


def test_skinny_linear_keeps_fp32_sums_when_asked(K):
    """The router's use: bf16 x and weight, fp32 logits. Products of bf16 values are exact in fp32, so the
    result is the fp32 GEMM up to summation order, and not rounded to bf16 afterwards."""
    from latentmoe.kernels.skinny import skinny_linear
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(1, 256, generator=gen).to(torch.bfloat16).to(DEV)
    w = torch.randn(64, 256, generator=gen).to(torch.bfloat16).to(DEV)
    out = skinny_linear(x, w, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (1, 64)
    ref = x.double() @ w.double().t()
    assert (out.double() - ref).abs().max() < 1e-4
    assert not torch.equal(out, out.to(torch.bfloat16).float())       # not rounded to bf16


def test_skinny_pair_and_swiglu_match_reference(K):
    from latentmoe.kernels.skinny import skinny_linear_pair, skinny_linear_ref, skinny_swiglu, skinny_swiglu_ref
    from latentmoe.model import RMSNorm
    g = torch.Generator().manual_seed(11)
    dtype = torch.float32 if not CUDA else torch.bfloat16
    x = torch.randn(2, 1, 256, generator=g).to(dtype).to(DEV)
    for fp8 in (False, True):
        ws = [torch.randn(n, 256, generator=g) * 0.05 for n in (136, 40, 72, 72)]
        pairs = [K.quantize_fp8_blocks(w) if fp8 else (w.to(dtype), None) for w in ws]
        pairs = [(w.to(DEV), None if s is None else s.to(DEV)) for w, s in pairs]
        (wq, sq), (wk, sk), (wg, sg), (wu, su) = pairs
        q, kv = skinny_linear_pair(x, wq, sq, wk, sk, max_rows=2)
        assert q.shape == (2, 1, 136) and kv.shape == (2, 1, 40)
        assert rel_err(q.float(), skinny_linear_ref(x, wq, sq).float()) < (1e-2 if CUDA else 1e-6)
        assert rel_err(kv.float(), skinny_linear_ref(x, wk, sk).float()) < (1e-2 if CUDA else 1e-6)
        h = skinny_swiglu(x, wg, sg, wu, su, max_rows=2)
        assert rel_err(h.float(), skinny_swiglu_ref(x, wg, sg, wu, su).float()) < (1e-2 if CUDA else 1e-6)
        # With the attention's input RMSNorm inside (its weight not ones; K in one slice and in four).
        norm = RMSNorm(256, eps=1e-5)
        norm.weight.data = (1 + 0.5 * torch.randn(256, generator=g)).to(dtype)
        norm = norm.to(DEV)
        xn = norm(x)
        for cfg in (None, dict(rows=2, block_n=4, block_k=64, num_warps=4, num_stages=1)):
            q, kv = skinny_linear_pair(x, wq, sq, wk, sk, config=cfg, max_rows=2, norm=(norm.weight, norm.eps))
            assert rel_err(q.float(), skinny_linear_ref(xn, wq, sq).float()) < (1e-2 if CUDA else 1e-6)
            assert rel_err(kv.float(), skinny_linear_ref(xn, wk, sk).float()) < (1e-2 if CUDA else 1e-6)
            assert rel_err(q.float(), skinny_linear_ref(x, wq, sq).float()) > 0.05    # the norm did apply


def test_skinny_declines_what_it_does_not_cover(K):
    from latentmoe.kernels.skinny import SKINNY_MAX_ROWS, skinny_linear, skinny_linear_pair
    w = torch.randn(16, 32).to(DEV)
    assert skinny_linear(torch.randn(SKINNY_MAX_ROWS + 1, 32).to(DEV), w) is None          # too many rows
    assert skinny_linear(torch.randn(SKINNY_MAX_ROWS, 32).to(DEV), w) is not None
    assert skinny_linear(torch.randn(1, 32, dtype=torch.float64).to(DEV), w.double()) is None  # dtype
    assert skinny_linear(torch.randn(1, 32).to(DEV), w.t().contiguous().t()) is None      # column-major weight
    q, s = K.quantize_fp8_blocks(w)
    assert skinny_linear_pair(torch.randn(1, 32).to(DEV), w, None, q.to(DEV), s.to(DEV)) is None  # mixed kinds



@pytest.mark.parametrize("B", [1, 3, 4])
def test_per_head_matmul_matches_reference(K, B):
    """Absorbed decode's two per-head products on views of one kv_b_proj weight: W_UK [H, N, C] as stored
    (columns contiguous) and W_UV transposed (rows contiguous); widths that are not multiples of the tiles."""
    from latentmoe.kernels.skinny import per_head_matmul, per_head_matmul_ref
    g = torch.Generator().manual_seed(B)
    dtype = torch.float32 if not CUDA else torch.bfloat16
    H, N, V, C = 3, 24, 20, 72
    w = (torch.randn(H * (N + V), C, generator=g) * 0.1).to(dtype).to(DEV).view(H, N + V, C)
    w_uk, w_uv = w[:, :N], w[:, N:]
    q_nope = torch.randn(B, H, N, generator=g).to(dtype).to(DEV)
    o_lat = torch.randn(B, H, C, generator=g).to(dtype).to(DEV)
    for x, m in ((q_nope, w_uk), (o_lat, w_uv.transpose(1, 2))):
        want = per_head_matmul_ref(x, m)
        for max_rows in (4, 0):   # the kernel, then the batched GEMM
            got = per_head_matmul(x, m, max_rows=max_rows)
            assert got.shape == want.shape and got.is_contiguous() and got.dtype == dtype
            assert rel_err(got.float(), want.float()) < (1e-2 if CUDA else 1e-6), (B, max_rows, tuple(m.shape))
    with pytest.raises(ValueError):
        per_head_matmul(q_nope, w_uv)   # K of x (N) is not the weight's
