"""The engine's own module tree with its fused forwards (RMSNorm, MLA post-projection, router, routed
experts; engine/layers.py) against the model's modules, and engine greedy output with them on == off ==
plain generation. Without CUDA it runs in a child pytest under Triton's interpreter (fp32: the
interpreter truncates on bf16 casts, a GPU rounds to nearest even).
"""

import pytest
import torch
from interpreter_child import IN_CHILD, run_module_under_interpreter

from latentmoe import build_model, get_config

CUDA = torch.cuda.is_available()
YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


@pytest.mark.skipif(CUDA or IN_CHILD, reason="the interpreter child runs only on machines without CUDA")
def test_fused_ops_under_triton_interpreter():
    run_module_under_interpreter(__file__)


@pytest.fixture(scope="module")
def dev():
    if not CUDA and not IN_CHILD:
        pytest.skip("runs in the TRITON_INTERPRET child (test_fused_ops_under_triton_interpreter)")
    torch.set_num_threads(1)
    return torch.device("cuda" if CUDA else "cpu")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("over", [dict(), dict(q_lora_rank=24, rope_scaling=YARN, norm_topk_prob=True),
                                  dict(routed_scaling_factor=2.5, num_experts_per_tok=3)])
@torch.inference_mode()
def test_fused_modules_match_model(dev, over):
    from latentmoe.engine.layers import engine_model
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=2, topk_method="greedy", n_group=1, topk_group=1, **over)
    model = build_model(cfg, device=dev, dtype=torch.float32, seed=1, std=0.1).eval()
    ids = torch.randint(0, 256, (2, 5), device=dev)
    pos = torch.randint(0, 300, (2, 5), device=dev)   # beyond the YaRN original length too
    ref, ref_r = model(ids, positions=pos, return_router=True)
    fused = engine_model(model, fused_ops=True)
    kinds = [type(m).__name__ for m in fused.modules()]
    assert [k.removeprefix("Engine") for k in kinds] == [type(m).__name__ for m in model.modules()]
    fusable = ("Linear", "RMSNorm", "MLA", "Router", "MLP", "Block")
    assert sum(k in tuple("Engine" + f for f in fusable) for k in kinds) == \
        sum(type(m).__name__ in fusable for m in model.modules())
    assert list(fused.state_dict()) == list(model.state_dict())
    out, out_r = fused(ids, positions=pos, return_router=True)
    assert rel(out, ref) < 1e-5
    for a, b in zip(out_r, ref_r):
        order_a, order_b = a.topk_idx.argsort(-1), b.topk_idx.argsort(-1)
        assert torch.equal(a.topk_idx.gather(-1, order_a), b.topk_idx.gather(-1, order_b))
        assert torch.allclose(a.topk_weight.gather(-1, order_a), b.topk_weight.gather(-1, order_b), atol=1e-6)
        assert torch.allclose(a.scores, b.scores, atol=1e-6)
    # Decode sizes (up to kernels.SKINNY_MAX_ROWS rows: the few-row GEMMs) and a few more.
    for rows in (1, 2):
        step_ids, step_pos = ids[:rows, :1], pos[:rows, :1]
        assert rel(fused(step_ids, positions=step_pos), model(step_ids, positions=step_pos)) < (1e-2 if CUDA else 1e-5)
    # The model itself still runs its own code. (On CUDA the model's fp32 expert loop sums with atomic
    # index_add_, so two runs differ in the last bits: there the check is a tolerance far below the fused path's.)
    again = model(ids, positions=pos)
    assert torch.equal(again, ref) if not CUDA else rel(again, ref) < 1e-6


@torch.inference_mode()
def test_fused_experts_match_model(dev):
    from latentmoe.engine.layers import engine_model
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=2)
    model = build_model(cfg, device=dev, dtype=torch.float32, seed=2, std=0.1).eval()
    fused = engine_model(model, fused_experts=True)
    assert any(type(m).__name__ == "EngineExperts" for m in fused.modules())
    assert any(type(m).__name__ == "EngineMoE" for m in fused.modules())   # shared experts added in the combine
    for shape in ((1, 1), (2, 1), (2, 7)):   # 1-2 tokens take the unsorted layout, more the sorted one
        ids = torch.randint(0, 256, shape, device=dev)
        assert rel(fused(ids), model(ids)) < (5e-3 if CUDA else 1e-5)   # fp32 tl.dot is tf32 on a GPU


@torch.inference_mode()
def test_fused_blocks_add_the_residual_in_the_combine(dev):
    """Fused ops and fused experts together: the MoE blocks' residual add happens in the experts' combine,
    rounded where the model's `h + (experts + shared)` rounds (bf16: equal within the GEMMs' own differences)."""
    from latentmoe.engine.layers import EngineBlock, EngineMoE, engine_model
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=3, topk_method="greedy", n_group=1, topk_group=1)
    model = build_model(cfg, device=dev, dtype=torch.float32, seed=3, std=0.1).eval()
    fused = engine_model(model, fused_ops=True, fused_experts=True)
    blocks = [m for m in fused.modules() if isinstance(m, EngineBlock)]
    assert sum(type(b.mlp) is EngineMoE for b in blocks) == sum(b.is_moe for b in model.model.layers) > 0
    for shape in ((1, 1), (2, 7)):
        ids = torch.randint(0, 256, shape, device=dev)
        assert rel(fused(ids), model(ids)) < (5e-3 if CUDA else 1e-5)


@torch.inference_mode()
def test_engine_greedy_with_fused_ops_matches_plain(dev):
    from latentmoe.engine import LLM, SamplingParams
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=2, topk_method="greedy", n_group=1, topk_group=1)
    model = build_model(cfg, device=dev, dtype=torch.float32, seed=0, std=0.08).eval()
    prompts = [[5, 17, 3, 99, 42, 7], [200, 1, 64]]
    want = []
    for p in prompts:
        ids = list(p)
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids], device=dev))[0, -1].argmax()))
        want.append(ids[len(p):])
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    got = {}
    for ops in (True, False):   # the same decode attention either way: only the fused ops differ
        llm = LLM(model, block_size=4, num_blocks=16, max_num_seqs=4, enforce_eager=True, fused_ops=ops,
                  experts_impl="model")
        assert llm.engine_config.fused_ops is ops
        got[ops] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        assert llm.block_manager.num_used_blocks == 0
    assert got[True] == got[False] == want


@torch.inference_mode()
def test_engine_batch1_decode_fusions_match_model(dev, monkeypatch):
    """A batch-1 decode through the engine's own MoE layer: the block's residual add and norm formed in the
    router's launch (route_one_token with add_norm), W_UK in the post-projection's launch; greedy tokens as the
    model's own, each fused path taken at every decode step."""
    import latentmoe.kernels as K
    from latentmoe.engine import LLM, SamplingParams
    calls = {"route_add_norm": 0, "w_uk": 0}
    route, post = K.route_one_token, K.mla_post_projection

    def counted_post(*a, **k):
        calls["w_uk"] += k.get("w_uk") is not None
        return post(*a, **k)

    def counted_route(*a, **k):
        out = route(*a, **k)
        calls["route_add_norm"] += k.get("add_norm") is not None and out is not None
        return out

    monkeypatch.setattr(K, "route_one_token", counted_route)
    monkeypatch.setattr(K, "mla_post_projection", counted_post)
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=3, topk_method="greedy", n_group=1, topk_group=1)
    model = build_model(cfg, device=dev, dtype=torch.float32, seed=0, std=0.08).eval()
    prompt = [5, 17, 3, 99, 42, 7]
    ids = list(prompt)
    for _ in range(4):
        ids.append(int(model(torch.tensor([ids], device=dev))[0, -1].argmax()))
    llm = LLM(model, block_size=4, num_blocks=16, max_num_seqs=4, enforce_eager=True, fused_ops=True,
              experts_impl="fused")
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].outputs[0].token_ids
    assert got == ids[len(prompt):]
    moe_layers = sum(type(m).__name__ == "EngineMoE" for m in llm.runner.model.modules())
    assert moe_layers >= 1 and calls == {"route_add_norm": 3 * moe_layers, "w_uk": 3 * cfg.num_hidden_layers}


@torch.inference_mode()
def test_expert_parallel_share_skips_other_ranks_experts(dev):
    """One expert-parallel rank's share (engine/tensor_parallel.py) in a one-process group: the fused
    experts skip the other rank's assignments (id -1) and give what the model's experts give with those
    assignments at weight 0."""
    import torch.distributed as dist

    from latentmoe.engine.layers import engine_model
    from latentmoe.engine.tensor_parallel import ShardPlan, build_shard
    from latentmoe.model import init_weights
    from latentmoe.parallel.launch import free_port

    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=2)
    dist.init_process_group("nccl" if CUDA else "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        share = build_shard(cfg, ShardPlan(1, 2, expert_parallel=True), dev, torch.float32)
        init_weights(share, std=0.1)
        ids = torch.randint(0, 256, (3, 5), device=dev)
        plain = engine_model(share)(ids)
        fused = engine_model(share, fused_experts=True)
        assert type(fused.model.layers[1].mlp.experts).__name__ == "EngineExperts"
        assert rel(fused(ids), plain) < 1e-5
    finally:
        dist.destroy_process_group()


@torch.inference_mode()
def test_engine_batched_prefill_kernel_matches_plain(dev, monkeypatch):
    # Chunked prompts (a budget of 5 tokens a step: chunks over a cached prefix, several chunks and
    # decodes in one step) through the Triton varlen prefill kernel: the same tokens as full recompute.
    import latentmoe.kernels.prefill as prefill
    from latentmoe.engine import LLM, SamplingParams
    calls = []
    triton_prefill = prefill.prefill_attention_triton
    monkeypatch.setattr(prefill, "prefill_attention_triton",
                        lambda *a, **k: calls.append(a[5].numel() - 1) or triton_prefill(*a, **k))
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=2, topk_method="greedy", n_group=1, topk_group=1)
    model = build_model(cfg, device=dev, dtype=torch.float32, seed=0, std=0.08).eval()
    prompts = [[5, 17, 3, 99, 42, 7, 8, 9, 10, 11, 12], [200, 1, 64], [7, 7, 7, 7, 7, 7, 7]]
    want = []
    for p in prompts:
        ids = list(p)
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids], device=dev))[0, -1].argmax()))
        want.append(ids[len(p):])
    llm = LLM(model, block_size=4, num_blocks=32, max_num_seqs=4, enforce_eager=True, max_num_batched_tokens=5,
              experts_impl="model")
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=3,
                                                                                ignore_eos=True))]
    assert got == want
    assert calls and max(calls) >= 2   # the kernel ran, at least once over two chunks in one call
