"""Batched (varlen) prefill attention against its torch reference, and the reference against dense causal
attention: Triton's interpreter on CPU (small shapes), the GPU at full size."""
import pytest
import torch
from interpreter_child import IN_CHILD, run_module_under_interpreter

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")


@pytest.mark.skipif(CUDA or IN_CHILD, reason="the interpreter child runs only on machines without CUDA")
def test_prefill_kernels_under_triton_interpreter():
    run_module_under_interpreter(__file__)


def make_inputs(chunks, H, N, R, V, dtype, shared_pe=True, seed=0, device=DEV, as_engine=False):
    """chunks: (prefix, q_len) per sequence -> q/k/v rows. as_engine: laid out as the engine lays them out,
    q_nope and q_pe views of one [T, H, N + R] projection, k_nope and v views of one [S, H, N + V]."""
    g = torch.Generator().manual_seed(seed)
    T = sum(q for _, q in chunks)
    S = sum(p + q for p, q in chunks)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)   # noqa: E731
    if as_engine:
        q, kv = r(T, H, N + R), r(S, H, N + V)
        q_nope, q_pe, k_nope, v = q[..., :N], q[..., N:], kv[..., :N], kv[..., N:]
    else:
        q_nope, q_pe, k_nope, v = r(T, H, N), r(T, H, R), r(S, H, N), r(S, H, V)
    k_pe = r(S, R) if shared_pe else r(S, H, R)
    cu_q = torch.tensor([0] + [q for _, q in chunks], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    cu_k = torch.tensor([0] + [p + q for p, q in chunks], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, max(q for _, q in chunks)


def rel_err(out, ref):
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def test_reference_equals_dense_causal_attention():
    # A chunk with a cached prefix sees all of it: the same rows as the tail of full causal attention.
    q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, _ = make_inputs([(0, 13)], 2, 8, 4, 6, torch.float64, seed=3,
                                                                 device="cpu")
    from latentmoe.kernels import prefill_attention_ref
    full = prefill_attention_ref(q_nope, q_pe, k_nope, k_pe, v, cu_q, cu_k, 0.4)
    q_tail = torch.cat([q_nope[9:], q_pe[9:]], -1)
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, 2, -1)], -1)
    s = torch.einsum("thd,shd->hts", q_tail, k) * 0.4
    s = s.masked_fill(torch.arange(13)[None, None, :] > torch.arange(9, 13)[None, :, None], float("-inf"))
    dense = torch.einsum("hts,shv->thv", s.softmax(-1), v)
    tail = prefill_attention_ref(q_nope[9:], q_pe[9:], k_nope, k_pe, v, torch.tensor([0, 4], dtype=torch.int32),
                                 torch.tensor([0, 13], dtype=torch.int32), 0.4)
    assert rel_err(tail, dense) < 1e-12 and rel_err(full[9:], dense) < 1e-12


def test_merge_attention_parts_equals_attention_over_both():
    # Attention over keys A and over keys B, merged by log-sum-exps: attention over A and B at once.
    g = torch.Generator().manual_seed(11)
    q, k, v = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 9, 8, generator=g,
                                                                                   dtype=torch.float64), \
        torch.randn(2, 9, 6, generator=g, dtype=torch.float64)
    s = torch.einsum("htd,hsd->hts", q, k) * 3   # sharp: the parts' masses differ by orders of magnitude
    full = torch.einsum("hts,hsv->htv", s.softmax(-1), v)

    def part(lo, hi):
        return torch.einsum("hts,hsv->htv", s[..., lo:hi].softmax(-1), v[:, lo:hi]), s[..., lo:hi].logsumexp(-1)

    from latentmoe.kernels.prefill import merge_attention_parts, merge_attention_parts_ref
    want = full.transpose(0, 1)   # [T, H, V], the rows the output projection reads
    assert rel_err(merge_attention_parts_ref(*part(0, 4), *part(4, 9)), want) < 1e-6   # fp32 arithmetic
    assert rel_err(merge_attention_parts_ref(*part(4, 9), *part(0, 4)), want) < 1e-6
    # The kernel (fp32 arithmetic) on bf16 parts laid out as cuDNN returns them: [H, T, V] views of [T, H, V].
    (o1, l1), (o2, l2) = part(0, 4), part(4, 9)
    o1, o2 = (o.transpose(0, 1).contiguous().to(torch.bfloat16).to(DEV).transpose(0, 1) for o in (o1, o2))
    got = merge_attention_parts(o1, l1.float().to(DEV), o2, l2.float().to(DEV))
    assert got.shape == want.shape and got.is_contiguous()
    assert rel_err(got.cpu(), want) < 1e-2


def test_joined_is_a_view_only_for_adjacent_columns():
    from latentmoe.kernels.prefill import joined
    q = torch.randn(5, 3, 12)
    a, b = q[..., :8], q[..., 8:]
    j = joined(a, b)
    assert j is not None and j.data_ptr() == q.data_ptr() and torch.equal(j, q)
    assert torch.equal(joined(q[1:, :, :8], q[1:, :, 8:]), q[1:])           # a slice of rows keeps working
    assert joined(b, a) is None and joined(q[..., :4], q[..., 8:]) is None   # wrong order, a gap
    assert joined(torch.randn(5, 3, 8), torch.randn(5, 3, 4)) is None        # separate tensors


@pytest.mark.parametrize("shared", [True, False])
def test_concat_heads(K, shared):
    from latentmoe.kernels.prefill import concat_heads, concat_heads_ref
    g = torch.Generator().manual_seed(2)
    a = torch.randn(7, 3, 20, generator=g).to(torch.bfloat16).to(DEV)[..., :12]   # strided, as split from kv_b_proj
    b = torch.randn(7, 4, generator=g) if shared else torch.randn(7, 3, 4, generator=g)
    b = b.to(torch.bfloat16).to(DEV)
    out = concat_heads(a, b)
    ref = concat_heads_ref(a, b)
    assert out.shape == (7, 3, 16) and torch.equal(out, ref)
    assert torch.equal(out[..., :12], a)
    assert torch.equal(out[..., 12:], b[:, None].expand(7, 3, 4) if shared else b)


@pytest.mark.parametrize("chunks", [[(0, 5)], [(0, 33), (20, 7), (0, 1), (64, 40)], [(3, 1), (0, 17)]])
@pytest.mark.parametrize("shared_pe", [True, False])
def test_prefill_attention_ragged(K, chunks, shared_pe):
    H, N, R, V = 3, 32, 16, 16
    args = make_inputs(chunks, H, N, R, V, torch.bfloat16, shared_pe)
    ref = K.prefill_attention_ref(*(a.double() if a.is_floating_point() else a for a in args[:7]), 0.2)
    out = K.prefill_attention_triton(*args, 0.2, block_m=16, block_n=16)
    assert out.shape == (args[0].shape[0], H, V) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_prefill_attention_fp32_odd_widths(K):
    # Head sizes that are not powers of two (masked lanes), fp32, default tiles.
    args = make_inputs([(10, 20), (0, 3)], 2, 24, 16, 20, torch.float32)
    ref = K.prefill_attention_ref(*(a.double() if a.is_floating_point() else a for a in args[:7]), 0.3)
    assert rel_err(K.prefill_attention(*args, 0.3), ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_prefill_attention_full_size(K):
    # V2-Lite heads: N=128, R=64, V=128, 16 heads; prompts of a few thousand tokens, some with prefixes.
    args = make_inputs([(0, 2048), (1000, 500), (0, 1), (300, 1200)], 16, 128, 64, 128, torch.bfloat16)
    ref = K.prefill_attention_ref(*(a.float() if a.is_floating_point() else a for a in args[:7]), 0.07)
    assert rel_err(K.prefill_attention(*args, 0.07), ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shared_pe,as_engine", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("path", ["dispatch", "triton"])
def test_prefill_attention_paths_against_reference(K, path, shared_pe, as_engine):
    # A mix of chunks (whole prompts, chunks after a cached prefix, one-token chunks) through the engine's
    # entry and through the Triton kernel directly.
    chunks = [(0, 700), (513, 64), (0, 1), (1000, 129), (7, 1)]
    args = make_inputs(chunks, 16, 128, 64, 128, torch.bfloat16, shared_pe, seed=5, as_engine=as_engine)
    ref = K.prefill_attention_ref(*(a.float() if a.is_floating_point() else a for a in args[:7]), 0.07)
    if path == "dispatch":
        out = K.prefill_attention(*args, 0.07, max_k=max(p + q for p, q in chunks))
    else:
        out = K.prefill_attention_triton(*args, 0.07)
    assert out.shape == (args[0].shape[0], 16, 128) and out.is_contiguous()
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("shared_pe,as_engine", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("chunk", [(0, 700), (513, 300), (4000, 1), (0, 4352), (100, 4100)])
def test_prefill_attention_one_chunk_cudnn_against_reference(K, chunk, shared_pe, as_engine):
    # A step of one chunk (a long prompt): cuDNN's attention, the prefix part merged with the causal part;
    # the chunk padded to its ladder length (4352 is one: no padding; the others are padded).
    from latentmoe.kernels.prefill import cudnn_supported, prefill_attention_cudnn
    args = make_inputs([chunk], 16, 128, 64, 128, torch.bfloat16, shared_pe, seed=6, as_engine=as_engine)
    if not cudnn_supported(args[0], args[1], args[4]):
        pytest.skip("cuDNN attention needs sm90+ here")
    ref = K.prefill_attention_ref(*(a.float() if a.is_floating_point() else a for a in args[:7]), 0.07)
    out = prefill_attention_cudnn(*args[:5], 0.07)
    assert out.shape == (chunk[1], 16, 128) and out.is_contiguous() and rel_err(out, ref) < 1e-2
    # The engine's entry takes this path for a one-chunk step (the longest chunk and context given).
    assert rel_err(K.prefill_attention(*args, 0.07, max_k=sum(chunk)), ref) < 1e-2


def test_cudnn_length_ladder(monkeypatch):
    # cuDNN plans per length, so one-chunk steps run padded to a ladder: never shorter, under 1/16 longer,
    # a ladder length maps to itself, and longer chunks never map shorter.
    from latentmoe.kernels import prefill
    previous = 0
    for n in list(range(1, 5000)) + list(range(5000, 300000, 997)):
        L = prefill.cudnn_length(n)
        assert n <= L < n + max(1, n / 16) and prefill.cudnn_length(L) == L and L >= previous
        previous = L
    assert prefill.cudnn_lengths(65536, torch.device("cpu"), torch.bfloat16) == []   # no cuDNN attention here
    # Where cuDNN runs, start-up runs these: together they give every padded length a chunk of the budget or
    # fewer tokens can have, and none is over the budget.
    monkeypatch.setattr(prefill, "cudnn_usable", lambda device, dtype: True)
    for budget in (4095, 4096, 5000, 10000, 65536):
        runs = set(prefill.cudnn_lengths(budget, torch.device("cpu"), torch.bfloat16))
        assert max(runs, default=0) <= budget
        want = {prefill.cudnn_length(m) for m in range(prefill.CUDNN_MIN_CHUNK, budget + 1)}
        assert {prefill.cudnn_length(m) for m in runs} == want


@pytest.mark.parametrize("chunk", [(0, 37), (0, 64), (21, 45), (50, 1)])
def test_cudnn_path_pads_to_the_ladder_on_cpu(monkeypatch, chunk):
    # prefill_attention_cudnn's own work (padding to the ladder, the two parts, slicing, merging) on CPU: cuDNN's
    # op replaced by dense attention with the same contract (causal aligned to the top left). It must give the
    # reference's rows, hand the op only ladder lengths, and lay them out as the engine's projections lay out
    # their rows whether or not a length was padded (the op's plans are likely kept by strides too).
    from latentmoe.kernels import prefill
    calls = []

    def dense(q, k, v, causal, scale):
        calls.append((q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), causal))
        s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).tril().logical_not(), float("-inf"))
        return torch.einsum("bhqk,bhkv->bhqv", s.softmax(-1), v.double()).to(q.dtype), s.logsumexp(-1)
    monkeypatch.setattr(prefill, "cudnn_attention", dense)
    H, N, R, V = 2, 8, 4, 6
    args = make_inputs([chunk], H, N, R, V, torch.float64, seed=9, device="cpu", as_engine=True)
    out = prefill.prefill_attention_cudnn(*args[:5], 0.3)
    assert out.shape == (chunk[1], H, V) and out.is_contiguous()
    assert rel_err(out, prefill.prefill_attention_ref(*args[:7], 0.3)) < 1e-6   # fp32 merge under the interpreter
    Tp = prefill.cudnn_length(chunk[1])
    assert [c[-1] for c in calls] == [True] + ([False] if chunk[0] else [])
    q_shape, q_stride, k_shape, k_stride, v_shape, v_stride, _ = calls[0]    # the chunk over itself
    assert q_shape == (1, H, Tp, N + R) and k_shape == (1, H, Tp, N + R) and v_shape == (1, H, Tp, V)
    # Heads-first views of [Tp, H, *] rows with the engine's strides (the size-1 batch's stride aside).
    assert q_stride[1:] == k_stride[1:] == (N + R, H * (N + R), 1) and v_stride[1:] == (N + V, H * (N + V), 1)
