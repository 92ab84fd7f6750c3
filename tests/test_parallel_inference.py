"""Expert-parallel inference in one process: experts split over N devices (N CPU "devices" here;
the same code places slices on cuda:0..N-1) give the plain model's logits and the engine's tokens."""

from __future__ import annotations

import pytest
import torch

from latentmoe.checkpoint import load_model, save_model
from latentmoe.config import get_config
from latentmoe.model import build_model
from latentmoe.parallel.inference import DeviceShardedExperts, load_model_expert_parallel


def small_checkpoint(path, **over):
    cfg = get_config("tiny", vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=48,
                     moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, **over)
    save_model(build_model(cfg, seed=0, std=0.2), path, max_shard_size="20KB")  # sharded on disk too
    return cfg


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_experts_match_plain_model(tmp_path, n):
    small_checkpoint(tmp_path)
    plain, sharded = load_model(tmp_path), load_model_expert_parallel(tmp_path, n, device="cpu")
    layers = [layer.mlp.experts for layer in sharded.model.layers if layer.is_moe]
    assert all(isinstance(e, DeviceShardedExperts) and len(e.shards) == n for e in layers)
    assert all(s.gate_up_proj.shape[0] == 8 // n for e in layers for s in e.shards)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids), plain(ids), rtol=1e-5, atol=1e-5)


def test_engine_generates_the_same_tokens(tmp_path):
    from latentmoe.engine import LLM, SamplingParams

    small_checkpoint(tmp_path, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    plain = LLM(str(tmp_path), device="cpu", enforce_eager=True).generate(prompts, params)
    sharded = LLM(load_model_expert_parallel(tmp_path, 2, device="cpu"), device="cpu", enforce_eager=True).generate(
        prompts, params)
    assert [o.outputs[0].token_ids for o in sharded] == [o.outputs[0].token_ids for o in plain]
    # `--ep N` (generate, chat, serve) loads the same split and hands it to the engine, graphs off
    from latentmoe.cli import build_parser
    from latentmoe.commands._engine_args import build_llm
    args = build_parser().parse_args(["generate", str(tmp_path), "--device", "cpu", "--ep", "2"])
    llm = build_llm(args, args.path)
    assert type(llm.model.model.layers[-1].mlp.experts).__name__ == "DeviceShardedExperts"
    assert llm.engine_config.enforce_eager
    via_cli = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in via_cli] == [o.outputs[0].token_ids for o in plain]
    args.ep = 0
    with pytest.raises(ValueError, match="--ep"):
        build_llm(args, args.path)


def test_experts_must_divide(tmp_path):
    small_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="must divide n_routed_experts"):
        load_model_expert_parallel(tmp_path, 3, device="cpu")
