"""The model against transformers' DeepseekV2ForCausalLM (ground truth) and its own reference paths."""

import pytest
import torch

import latentmoe
from latentmoe import build_model, get_config

CASES = [
    # q_lora_rank, topk_method, yarn, first_k_dense_replace
    (None, "greedy", False, 1),
    (24, "greedy", True, 0),
    (None, "group_limited_greedy", True, 2),
    (24, "group_limited_greedy", False, 1),
]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("q_lora,method,yarn,dense", CASES)
def test_logits_match_transformers(hf_factory, q_lora, method, yarn, dense):
    hf, path = hf_factory(q_lora_rank=q_lora, topk_method=method, yarn=yarn, dense=dense)
    model = latentmoe.load_model(path)
    for batch, length in [(1, 7), (3, 33), (2, 70)]:
        ids = torch.randint(0, hf.config.vocab_size, (batch, length))
        with torch.no_grad():
            ref = hf(ids).logits
            out = model(ids)
        assert out.shape == (batch, length, hf.config.vocab_size)
        assert rel_err(out, ref) < 1e-5


def test_padded_batch_matches_transformers(hf_factory):
    hf, path = hf_factory(q_lora_rank=16, topk_method="group_limited_greedy", yarn=True)
    model = latentmoe.load_model(path)
    ids = torch.randint(0, hf.config.vocab_size, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 15:] = 0   # right padding
    mask[2, :6] = 0    # left padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask)
    valid = mask.bool()
    assert rel_err(out[valid], ref[valid]) < 1e-5
    # a padded row's real tokens equal the same tokens run alone (right padding keeps positions)
    with torch.no_grad():
        alone = model(ids[1:2, :15])
    assert rel_err(out[1, :15], alone[0]) < 1e-5


def test_released_rope_scaling_forms_agree(hf_factory, tmp_path):
    """`rope_scaling` {type: yarn} (released) and {rope_type: yarn} (newer) load to the same model."""
    import json
    hf, path = hf_factory(yarn=True)
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    theta = params.pop("rope_theta")
    params.pop("rope_type", None)
    for key in ("type", "rope_type"):
        c = dict(cfg, rope_theta=theta, rope_scaling=dict(params, **{key: "yarn"}))
        c["rope_scaling"].pop("type" if key == "rope_type" else "rope_type", None)
        (path / "config.json").write_text(json.dumps(c))
        model = latentmoe.load_model(path)
        ids = torch.randint(0, 100, (1, 50))
        with torch.no_grad():
            assert rel_err(model(ids), hf(ids).logits) < 1e-5


def test_absorbed_equals_decompressed():
    cfg = get_config("tiny", q_lora_rank=24, rope_scaling={"type": "yarn", "factor": 4.0,
                     "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.707})
    model = build_model(cfg, seed=1, std=0.05).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        for m in (None, mask):
            model.set_attention_mode("decompressed")
            a = model(ids, attention_mask=m)
            model.set_attention_mode("absorbed")
            b = model(ids, attention_mask=m)
            assert rel_err(b, a) < 1e-5
    # and at the level of one layer with a longer key set than queries (decode-like)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 9, cfg.hidden_size)
    pos = torch.arange(9).expand(2, 9)
    cos, sin = model.model.rotary(pos)
    q_nope, q_pe, c_kv, k_pe = attn.project(x, cos, sin)
    with torch.no_grad():
        a = attn.attend_decompressed(q_nope[:, -2:], q_pe[:, -2:], c_kv, k_pe,
                                     torch.ones(2, 9, dtype=torch.bool).tril(7)[-2:].expand(2, 1, 2, 9))
        b = attn.attend_absorbed(q_nope[:, -2:], q_pe[:, -2:], c_kv, k_pe, None)
    assert rel_err(b, a) < 1e-5


def test_grouped_experts_equal_per_expert_loop():
    """The grouped path (expert-sorted tokens) equals a naive per-token, per-expert computation."""
    cfg = get_config("tiny")
    model = build_model(cfg, seed=2, std=0.1).eval()
    moe = next(layer.mlp for layer in model.model.layers if layer.is_moe)
    x = torch.randn(37, cfg.hidden_size)
    with torch.no_grad():
        scores, w, idx = moe.gate(x)
        y = moe.experts(x, idx, w)
        ref = torch.zeros_like(x)
        I = cfg.moe_intermediate_size
        for t in range(x.shape[0]):
            for k in range(idx.shape[1]):
                e = idx[t, k]
                gu = moe.experts.gate_up_proj[e] @ x[t]
                h = torch.nn.functional.silu(gu[:I]) * gu[I:]
                ref[t] += w[t, k] * (moe.experts.down_proj[e] @ h)
    assert rel_err(y, ref) < 1e-5
    # torch's grouped GEMM (one kernel for all experts) gives the same result where it runs (CPU fp32 here)
    moe.experts.impl = "grouped_mm"
    with torch.no_grad():
        y2 = moe.experts(x, idx, w)
    moe.experts.impl = "auto"
    assert rel_err(y2, ref) < 1e-5


def test_group_limited_routing_uses_max_and_topk_groups():
    cfg = get_config("tiny")  # 8 experts, 4 groups, top-2 groups, K = 2
    model = build_model(cfg, seed=3)
    router = next(layer.mlp.gate for layer in model.model.layers if layer.is_moe)
    x = torch.randn(200, cfg.hidden_size)
    scores, w, idx = router(x)
    groups = idx // (cfg.n_routed_experts // cfg.n_group)
    # every token's experts lie in its two groups with the largest MAX affinity
    gscore = scores.view(200, cfg.n_group, -1).amax(-1)
    best = gscore.topk(cfg.topk_group, dim=-1).indices
    for t in range(200):
        assert set(groups[t].tolist()) <= set(best[t].tolist())
    assert torch.allclose(w.sum(-1), scores.gather(1, idx).sum(-1) * cfg.routed_scaling_factor)


def test_norm_topk_prob_normalises_instead_of_scaling():
    cfg = get_config("tiny", norm_topk_prob=True, routed_scaling_factor=16.0)
    router = next(layer.mlp.gate for layer in build_model(cfg, seed=4).model.layers if layer.is_moe)
    _, w, _ = router(torch.randn(10, cfg.hidden_size))
    assert torch.allclose(w.sum(-1), torch.ones(10), atol=1e-6)


def test_router_outputs_returned_with_gradient():
    cfg = get_config("tiny")
    model = build_model(cfg, seed=5)
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    logits, routers = model(ids, return_router=True)
    assert len(routers) == cfg.num_moe_layers
    r = routers[0]
    assert r.scores.shape == (16, cfg.n_routed_experts) and r.scores.dtype == torch.float32
    assert r.topk_idx.shape == (16, cfg.num_experts_per_tok)
    r.scores.sum().backward(retain_graph=True)  # the affinities are differentiable w.r.t. the router
    gate = next(layer.mlp.gate for layer in model.model.layers if layer.is_moe)
    assert gate.weight.grad is not None


def test_moe_layer_freq_places_dense_layers():
    cfg = get_config("tiny", num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
    model = build_model(cfg)
    assert [layer.is_moe for layer in model.model.layers] == [False, False, True, False, True, False]


def test_router_affinities_stay_fp32_under_autocast():
    cfg = get_config("tiny")
    gate = next(layer.mlp.gate for layer in build_model(cfg, seed=6).model.layers if layer.is_moe)
    x = torch.randn(5, cfg.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _, _ = gate(x)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, gate(x)[0])  # bit-equal to the fp32 computation outside autocast


def test_triton_experts_impl_gives_the_same_loss_and_gradients():
    """`set_experts_impl('triton')` (the fused training path; on CPU its exact fallback) matches the loop."""
    cfg = get_config("tiny", num_hidden_layers=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    grads = {}
    for impl in ("loop", "triton"):
        model = build_model(cfg, seed=7, std=0.05)
        model.set_experts_impl(impl)
        loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = grads["loop"], grads["triton"]
    assert torch.allclose(l0, l1, rtol=1e-6)
    assert g0.keys() == g1.keys() and any("experts" in n for n in g0)
    for n in g0:
        assert rel_err(g1[n], g0[n]) < 1e-5, n
    with pytest.raises(ValueError, match="triton"):
        build_model(cfg).set_experts_impl("cuda")


def test_grouped_gemm_only_for_aligned_expert_widths():
    # torch._grouped_mm wants 16-byte row strides: expert widths not divisible by 8 take the exact loop
    # instead of failing (the attention ablation matches parameters by expert width).
    from types import SimpleNamespace

    from latentmoe.model import Experts
    x = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(4, 64))
    for width, aligned in ((32, True), (30, False)):
        experts = Experts(get_config("tiny", hidden_size=64, moe_intermediate_size=width))
        assert experts.use_grouped_mm(x) == (aligned and hasattr(torch, "_grouped_mm"))
    experts = Experts(get_config("tiny", hidden_size=60, moe_intermediate_size=32))
    assert not experts.use_grouped_mm(SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, shape=(4, 60)))
