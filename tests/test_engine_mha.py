"""The engine with a per-head K/V cache (kv_cache="mha"): same greedy tokens as plain generation and
as the latent engine, through chunked prefill, preemption and the graph path; the planner sizes it
from the same memory budget; the Triton paged decode kernel matches its torch reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from latentmoe import build_model, get_config
from latentmoe.engine import LLM, SamplingParams
from latentmoe.engine.mha_attention import mha_decode_torch
from latentmoe.engine.model_runner import cache_bytes_per_token, mha_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    cfg = get_config("tiny", vocab_size=512, num_hidden_layers=3)
    return build_model(cfg, seed=0, std=0.08).eval()


@pytest.fixture(scope="module")
def expected(model):
    """Plain generation: the whole sequence through the model (decompressed SDPA) each step."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 1, 30, 9, 12)]
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(GREEDY.max_tokens):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            outs.append(ids[len(p):])
    assert len({tuple(o) for o in outs}) == len(outs)   # not degenerate
    return prompts, outs


def assert_no_leak(llm):
    assert llm.block_manager.num_used_blocks == 0 and not llm.has_unfinished()


@pytest.mark.parametrize("kwargs", [
    dict(),                                                   # one big batch
    dict(max_num_batched_tokens=8, max_num_seqs=4),           # chunked prefill mixed with decodes
    dict(num_blocks=12, block_size=4, max_model_len=40),      # tiny cache: forced preemption
    dict(block_size=1, max_num_batched_tokens=5, max_num_seqs=5),
], ids=["batch", "chunked", "preempt", "bs1"])
def test_mha_cache_greedy_matches_plain_and_latent(model, expected, kwargs):
    prompts, want = expected
    kwargs = {"block_size": 4, "num_blocks": 200, **kwargs}
    got = {}
    for kind in ("mha", "latent"):
        llm = LLM(model, kv_cache=kind, **kwargs)
        got[kind] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
        if kwargs.get("num_blocks") == 12:
            assert llm.scheduler.num_preemptions > 0
        assert_no_leak(llm)
    assert got["mha"] == want
    assert got["mha"] == got["latent"]


def test_mha_cache_holds_per_head_kv(model, expected):
    # The cache really is per-head K/V: [NB, BS, H, N+R] and [NB, BS, H, V] per layer, and a
    # prefix-cache hit plus the graph path's padded static buffers still give the same tokens.
    prompts, want = expected
    cfg = model.config
    llm = LLM(model, kv_cache="mha", block_size=4, num_blocks=200, max_num_seqs=24, max_model_len=120)
    k, v = llm.runner.kv_caches[0]
    assert k.shape == (200, 4, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    assert v.shape == (200, 4, cfg.num_attention_heads, cfg.v_head_dim)
    llm.runner.enable_graph_emulation()
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
    again = llm.generate(prompts[3:4], GREEDY)     # 30-token prompt: its full blocks come from the cache
    assert llm.block_manager.num_prefix_hits > 0 and again[0].outputs[0].token_ids == want[3]
    assert_no_leak(llm)


def test_cache_planner_sizes_both_from_one_budget(model):
    cfg = model.config
    llms = {kind: LLM(model, kv_cache=kind, block_size=4, cache_memory_gb=0.002, max_model_len=64)
            for kind in ("latent", "mha")}
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    per_tok = {"latent": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L * 4,
               "mha": H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * L * 4}
    budget = 0.002 * 2 ** 30
    for kind, llm in llms.items():
        blocks = llm.stats()["num_blocks_total"]
        assert blocks == int(budget // (per_tok[kind] * 4))
        used = sum(t.numel() * t.element_size() for layer in llm.runner.kv_caches
                   for t in (layer if isinstance(layer, tuple) else (layer,)))
        assert used == (blocks + 1) * 4 * per_tok[kind]   # the reserved null block included
    ratio = llms["latent"].stats()["num_blocks_total"] / llms["mha"].stats()["num_blocks_total"]
    assert ratio == pytest.approx(per_tok["mha"] / per_tok["latent"], rel=0.01)


def test_v2_lite_bytes_per_token():
    # V2-Lite, bf16: latent (512 + 64) x 27 layers x 2 B; per-head 16 x (192 + 128) x 27 x 2 B.
    cfg = get_config("deepseek-v2-lite")
    assert cache_bytes_per_token(cfg, torch.bfloat16) == 31_104
    assert mha_bytes_per_token(cfg, torch.bfloat16) == 276_480          # 270 KiB
    assert 276_480 / 31_104 == pytest.approx(8.89, abs=0.01)


def test_bad_kv_cache_name(model):
    with pytest.raises(ValueError, match="kv_cache"):
        LLM(model, kv_cache="gqa", num_blocks=10, block_size=4)


def test_mha_decode_reference_matches_dense_attention():
    torch.manual_seed(0)
    B, H, DK, DV, BS, NB = 3, 4, 24, 16, 4, 20
    k, v = torch.randn(NB, BS, H, DK), torch.randn(NB, BS, H, DV)
    lens, tables = [5, 12, 1], [[3, 7], [1, 9, 2], [4]]
    bt = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(B, H, DK)
    out = mha_decode_torch(q, k, v, bt, torch.tensor(lens, dtype=torch.int32), 0.3)
    for b in range(B):
        kb = torch.cat([k[blk] for blk in tables[b]])[: lens[b]]    # [S, H, DK]
        vb = torch.cat([v[blk] for blk in tables[b]])[: lens[b]]
        for h in range(H):
            p = (kb[:, h] @ q[b, h] * 0.3).softmax(-1)
            torch.testing.assert_close(out[b, h], p @ vb[:, h])


_KERNEL_CHECK = textwrap.dedent("""
    import torch, latentmoe.kernels._triton as tr
    from latentmoe.engine.mha_attention import mha_decode_triton, mha_decode_torch
    tr.POISON = True   # unwritten output elements stay NaN
    torch.manual_seed(1)
    B, H, DK, DV, BS, NB = 3, 3, 40, 24, 4, 24
    k, v = torch.randn(NB, BS, H, DK), torch.randn(NB, BS, H, DV)
    tables = [[5, 7, 11, 2], [1, 9, 3, 0], [4, 20, 17, 8]]
    bt = torch.tensor(tables, dtype=torch.int32)
    bt[1, 3] = 23                  # junk beyond the sequence's length must not be read
    sl = torch.tensor([13, 9, 1], dtype=torch.int32)
    q = torch.randn(B, H, DK)
    ref = mha_decode_torch(q, k, v, bt, sl, 0.25)
    for splits in (1, 2, 5):
        out = mha_decode_triton(q, k, v, bt, sl, 0.25, num_splits=splits, block_n=4)
        err = (out - ref).abs().max().item()
        assert err < 1e-5, (splits, err)
    print("ok")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the compiled kernel is checked instead")
def test_triton_paged_decode_kernel_under_interpreter():
    import triton  # noqa: F401  (a dev dependency: missing it must fail, not skip)
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CPU machines run the interpreter check)")
def test_triton_paged_decode_kernel_on_gpu():
    import latentmoe.kernels._triton as tr
    from latentmoe.engine.mha_attention import mha_decode_triton
    g = torch.Generator().manual_seed(3)
    B, H, DK, DV, BS, NB = 5, 16, 192, 128, 16, 400   # 63 blocks per sequence, shuffled
    k = torch.randn(NB, BS, H, DK, generator=g).cuda()
    v = torch.randn(NB, BS, H, DV, generator=g).cuda()
    lens = [1, 37, 500, 16, 999]
    bt = torch.randperm(NB, generator=g)[: B * 63].view(B, 63).to(torch.int32).cuda()
    sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, DK, generator=g).cuda()
    ref = mha_decode_torch(q.double(), k.double(), v.double(), bt, sl, 0.07)
    tr.POISON = True   # unwritten output elements stay NaN
    try:
        for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 2e-2)):   # fp32 runs as tf32 on the GPU
            for splits in (1, 3, None):
                out = mha_decode_triton(q.to(dtype), k.to(dtype), v.to(dtype), bt, sl, 0.07, num_splits=splits)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                assert err < tol, (dtype, splits, err)
    finally:
        tr.POISON = False
