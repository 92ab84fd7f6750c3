"""The engine with a per-head K/V cache (kv_cache="mha"): same greedy tokens as plain generation and
as the latent engine, through chunked prefill, preemption and the graph path; the planner sizes it
from the same memory budget. (Its decode kernel is tested with the others in test_kernels.py.)"""

from __future__ import annotations

import pytest
import torch

from latentmoe import build_model, get_config
from latentmoe.engine import LLM, LatentCache, PerHeadCache, SamplingParams
from latentmoe.kernels import mha_decode_ref

from test_engine import EagerGraphLLM

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
    llm = EagerGraphLLM(model, kv_cache="mha", block_size=4, num_blocks=200, max_num_seqs=24, max_model_len=120)
    k, v = llm.runner.kv_caches[0]
    assert k.shape == (200, 4, cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    assert v.shape == (200, 4, cfg.num_attention_heads, cfg.v_head_dim)
    outs = llm.generate(prompts, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == want
    again = llm.generate(prompts[3:4], GREEDY)     # 30-token prompt: its full blocks come from the cache
    assert llm.block_manager.num_prefix_hits > 0 and again[0].outputs[0].token_ids == want[3]
    assert llm.runner.graph_buckets   # the decodes went through the graph path
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
    assert LatentCache().bytes_per_token(cfg, torch.bfloat16) == 31_104
    assert PerHeadCache().bytes_per_token(cfg, torch.bfloat16) == 276_480          # 270 KiB
    assert 276_480 / 31_104 == pytest.approx(8.89, abs=0.01)


def test_layout_objects_and_tuning_reach_the_engine(model):
    with pytest.raises(ValueError, match="kv_cache"):
        LLM(model, kv_cache="gqa", num_blocks=10, block_size=4)
    layout = PerHeadCache(decode_tuning={"block_n": 16})
    llm = LLM(model, kv_cache=layout, block_size=4, num_blocks=20)
    assert llm.engine_config.kv_cache is layout and llm.runner.backend.decode_tuning == {"block_n": 16}


def test_mha_decode_reference_matches_dense_attention():
    torch.manual_seed(0)
    B, H, DK, DV, BS, NB = 3, 4, 24, 16, 4, 20
    k, v = torch.randn(NB, BS, H, DK), torch.randn(NB, BS, H, DV)
    lens, tables = [5, 12, 1], [[3, 7], [1, 9, 2], [4]]
    bt = torch.tensor([t + [0] * (3 - len(t)) for t in tables], dtype=torch.int32)
    q = torch.randn(B, H, DK)
    out = mha_decode_ref(q, k, v, bt, torch.tensor(lens, dtype=torch.int32), 0.3)
    for b in range(B):
        kb = torch.cat([k[blk] for blk in tables[b]])[: lens[b]]    # [S, H, DK]
        vb = torch.cat([v[blk] for blk in tables[b]])[: lens[b]]
        for h in range(H):
            p = (kb[:, h] @ q[b, h] * 0.3).softmax(-1)
            torch.testing.assert_close(out[b, h], p @ vb[:, h])
