"""The engine's fused decode glue (RMSNorm, MLA post-projection, router) against the model's own modules,
and engine greedy output with it on == plain generation. Without CUDA it runs in a child pytest under
Triton's interpreter (fp32: the interpreter truncates on bf16 casts, a GPU rounds to nearest even).
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
    from latentmoe.engine.fused_ops import set_fused_ops
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=2, topk_method="greedy", n_group=1, topk_group=1, **over)
    model = build_model(cfg, device=dev, dtype=torch.float32, seed=1, std=0.1).eval()
    ids = torch.randint(0, 256, (2, 5), device=dev)
    pos = torch.randint(0, 300, (2, 5), device=dev)   # beyond the YaRN original length too
    ref, ref_r = model(ids, positions=pos, return_router=True)
    n = set_fused_ops(model, True)
    assert n == sum(1 for m in model.modules() if type(m).__name__ in ("RMSNorm", "MLA", "Router"))
    out, out_r = model(ids, positions=pos, return_router=True)
    assert rel(out, ref) < 1e-5
    for a, b in zip(out_r, ref_r):
        order_a, order_b = a.topk_idx.argsort(-1), b.topk_idx.argsort(-1)
        assert torch.equal(a.topk_idx.gather(-1, order_a), b.topk_idx.gather(-1, order_b))
        assert torch.allclose(a.topk_weight.gather(-1, order_a), b.topk_weight.gather(-1, order_b), atol=1e-6)
        assert torch.allclose(a.scores, b.scores, atol=1e-6)
    # Switched back: the model's own code again, bit for bit; with autograd the model's path always serves.
    # (On CUDA the model's fp32 expert loop sums with atomic index_add_, so two runs of the model's own
    # code differ in the last bits: there the check is against a tolerance far below the fused path's.)
    def same(a, b):
        return torch.equal(a, b) if not CUDA else rel(a, b) < 1e-6
    set_fused_ops(model, False)
    assert same(model(ids, positions=pos), ref)
    set_fused_ops(model, True)
    with torch.enable_grad():
        assert same(model(ids, positions=pos), ref)
    set_fused_ops(model, False)


@pytest.mark.parametrize("M", [1, 2])
@torch.inference_mode()
def test_few_token_experts_match_reference(dev, M):
    from latentmoe.engine.fused_ops import fused_moe_few_tokens
    from latentmoe.kernels import fused_moe_ref
    g = torch.Generator().manual_seed(M)
    E, D, I, K = 8, 32, 48, 3
    x = torch.randn(M, D, generator=g).to(dev)
    w1 = (torch.randn(E, 2 * I, D, generator=g) * 0.2).to(dev)
    w2 = (torch.randn(E, D, I, generator=g) * 0.2).to(dev)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(M)]).to(dev)
    if M == 2:
        idx[1, 0] = idx[0, 1]   # two tokens sharing an expert
    w = torch.rand(M, K, generator=g).to(dev)
    # fp32 tl.dot runs as tf32 on a GPU; the interpreter is exact fp32.
    assert rel(fused_moe_few_tokens(x, w1, w2, idx, w), fused_moe_ref(x, w1, w2, idx, w)) < (5e-3 if CUDA else 1e-5)


@torch.inference_mode()
def test_engine_greedy_with_fused_ops_matches_plain(dev, monkeypatch):
    from latentmoe.engine import LLM, SamplingParams
    from latentmoe.engine.attention import IMPL
    monkeypatch.setitem(IMPL, "decode", "torch")   # exact fp32 attention on a GPU too: only the fused ops differ
    cfg = get_config("tiny", vocab_size=256, num_hidden_layers=2, topk_method="greedy", n_group=1, topk_group=1)
    model = build_model(cfg, device=dev, dtype=torch.float32, seed=0, std=0.08).eval()
    prompts = [[5, 17, 3, 99, 42, 7], [200, 1, 64]]
    want = []
    for p in prompts:
        ids = list(p)
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids], device=dev))[0, -1].argmax()))
        want.append(ids[len(p):])
    llm = LLM(model, block_size=4, num_blocks=16, max_num_seqs=4, enforce_eager=True, fused_ops=True,
              experts_impl="model")
    assert llm.fused_ops
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == want
    assert llm.block_manager.num_used_blocks == 0
    LLM(model, block_size=4, num_blocks=16, max_num_seqs=4, fused_ops=False)   # restores the model's own forwards
    assert all("forward" not in m.__dict__ and "project" not in m.__dict__ for m in model.modules())
