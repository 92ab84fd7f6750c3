"""Shared fixtures: small random DeepSeek-V2 configs and transformers reference checkpoints."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def K():
    """latentmoe.kernels for the Triton kernel tests, every output buffer NaN-filled (an unwritten or
    misaddressed element then fails the comparison). Without CUDA these tests run only in the module's
    TRITON_INTERPRET child (its *_under_triton_interpreter test), where a missing Triton fails, not skips."""
    if not torch.cuda.is_available() and os.environ.get("LATENTMOE_TRITON_TEST_CHILD") != "1":
        pytest.skip("runs in the TRITON_INTERPRET child (the module's *_under_triton_interpreter test)")
    import latentmoe.kernels as kernels
    if not kernels.HAS_TRITON:
        pytest.skip("Triton is not installed")
    with kernels.poisoned_outputs():
        yield kernels


def pytest_collection_modifyitems(config, items):
    """Without CUDA, Triton kernels are tested by Triton's interpreter in a child pytest (it must be
    chosen before triton is imported): the parent deselects those tests instead of listing them as
    skipped, and runs them through each module's child runner (tests/interpreter_child.py), which fails on any
    failed or skipped child test."""
    if torch.cuda.is_available() or os.environ.get("LATENTMOE_TRITON_TEST_CHILD") == "1":
        return
    # module -> fixture of its child-only tests (each module's runner: interpreter_child.py)
    in_child = {"test_kernels": "K", "test_kernels_fp8": "K", "test_kernels_prefill": "K", "test_kernels_moe_backward": "K",
                "test_engine_fused_ops": "dev"}
    keep, drop = [], []
    for item in items:
        fixture = in_child.get(item.module.__name__.rsplit(".", 1)[-1]) if item.module else None
        (drop if fixture and fixture in getattr(item, "fixturenames", ()) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def hf_config_kwargs(q_lora_rank=None, topk_method="greedy", yarn=False, dense=1, layers=3, vocab=128, **extra):
    """Keyword arguments for transformers' DeepseekV2Config of a tiny random model."""
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=layers, num_attention_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=2,
              num_experts_per_tok=3, first_k_dense_replace=dense, topk_method=topk_method,
              n_group=4 if topk_method == "group_limited_greedy" else None,
              topk_group=2 if topk_method == "group_limited_greedy" else None,
              routed_scaling_factor=2.0 if topk_method == "group_limited_greedy" else 1.0,
              max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    if yarn:
        kw["rope_scaling"] = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    kw.update(extra)
    return kw


def make_hf_checkpoint(path, seed=0, std=0.05, **kwargs):
    """Build transformers' DeepseekV2ForCausalLM with random weights, save_pretrained to `path`, return it."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(**hf_config_kwargs(**kwargs), initializer_range=std)).eval()
    hf.save_pretrained(path)
    return hf


@pytest.fixture
def hf_factory(tmp_path):
    counter = iter(range(1000))

    def factory(**kwargs):
        path = tmp_path / f"hf{next(counter)}"
        return make_hf_checkpoint(path, **kwargs), path

    return factory


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny matrices: many times faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
