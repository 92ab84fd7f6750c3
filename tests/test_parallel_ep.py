"""Expert parallelism on 2 and 4 gloo processes against the same model run in one process.

Each rank holds 1/W of the routed experts and 1/W of the batch; the single-process reference sees
the whole batch with the same weights, the trainer's device-limited routing and dropping rules
(D = EP size device groups) and the trainer's balance losses. Loss, every gradient, the global
gradient norm, a ZeRO-1 AdamW step, the per-rank token counts and the dropping decisions must agree.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
from safetensors import safe_open
import torch
import torch.distributed as dist
import torch.nn.functional as F

from latentmoe.checkpoint import load_model, save_model
from latentmoe.config import get_config
from latentmoe.model import build_model
from latentmoe.checkpoint.training import save_model_parts
from latentmoe.parallel.data_parallel import ZeroOptimizer, global_grad_norm, sync_gradients
from latentmoe.parallel.expert_parallel import ExpertParallelMoE, apply_expert_parallel, device_keep_mask, is_expert_param
from latentmoe.parallel.launch import run_local
from latentmoe.parallel.mesh import build_dims
from latentmoe.train.losses import balance_losses
from latentmoe.train.routing import DeviceDropper, protected_tokens

B_LOCAL, T, VOCAB = 2, 8, 64


def tiny_config():
    return get_config("tiny", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, intermediate_size=48,
                      moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                      topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1)


def moes(model):
    return [layer.mlp for layer in model.model.layers if layer.is_moe]


def objective(model, ids, devices, M, n_global_tokens, world):
    """CE summed over this batch / all tokens + balance losses / world: summed over ranks = the reference loss."""
    logits, routers = model(ids, return_router=True)
    ce = F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten(), reduction="sum") / n_global_tokens
    bal = balance_losses(routers, ids.shape[0], ids.shape[1], devices, M, 0.1, 0.2, 0.3)
    return ce, {k: v / world for k, v in bal.items()}, routers


def ep_worker(rank, world, experiments, device="cpu"):
    torch.set_num_threads(1)
    for ep, M, overlap, outdir in experiments:
        check_expert_parallel(rank, world, ep, M, overlap, outdir, torch.device(device, rank) if device == "cuda"
                              else torch.device(device))


def check_expert_parallel(rank, world, ep, M, overlap, outdir, device=torch.device("cpu")):
    """World = dp x ep ranks; each rank B_LOCAL sequences; the reference runs all W * B_LOCAL at once."""
    dims = build_dims(ep, device)
    cfg = tiny_config()
    L = cfg.n_routed_experts // ep
    model = build_model(cfg, seed=0, std=0.2).to(device)
    ref = copy.deepcopy(model)
    B = world * B_LOCAL
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1)).to(device)
    protected = protected_tokens(B, T, 0.25, torch.Generator().manual_seed(2)).to(device)
    mine = slice(rank * B_LOCAL * T, (rank + 1) * B_LOCAL * T)
    group_tokens = slice(dims.dp_rank * ep * B_LOCAL * T, (dims.dp_rank + 1) * ep * B_LOCAL * T)
    # Dropping is decided over an EP group's tokens: comparable with one process when dp = 1.
    drop = dims.dp_size == 1

    # Reference: one process, D = ep device groups, the trainer's dropper over the whole batch.
    for moe in moes(ref):
        moe.gate.device_limit = (ep, M)
        if drop:
            moe.dropper = DeviceDropper(ep, 1.0)
            moe.dropper.protected = protected
    ce_ref, bal_ref, routers_ref = objective(ref, ids, ep, M, ids.numel(), 1)
    (ce_ref + sum(bal_ref.values())).backward()

    apply_expert_parallel(model, dims.ep_group, dims.ep_rank, ep, M)
    for moe in moes(model):
        assert isinstance(moe, ExpertParallelMoE) and moe.experts.gate_up_proj.shape[0] == L
        moe.overlap = overlap
        if drop:
            moe.dropper = DeviceDropper(ep, 1.0)
            moe.dropper.protected = protected[mine]
    ce, bal, routers = objective(model, ids[rank * B_LOCAL:(rank + 1) * B_LOCAL], ep, M, ids.numel(), world)
    (ce + sum(bal.values())).backward()

    # Loss parts, summed over ranks.
    parts = torch.stack([ce.detach()] + [bal[k].detach() for k in ("exp", "dev", "comm")])
    dist.all_reduce(parts)
    expect = torch.stack([ce_ref.detach()] + [bal_ref[k].detach() for k in ("exp", "dev", "comm")])
    torch.testing.assert_close(parts, expect, rtol=1e-5, atol=1e-7)

    for r, rr in zip(routers, routers_ref):
        # Routing and device limit with real ranks.
        assert torch.equal(r.topk_idx, rr.topk_idx[mine])
        assert int(r.sent_MP.sum(1).max()) <= M
        unlimited = rr.scores.topk(cfg.num_experts_per_tok, dim=-1).indices // L
        n_dev = torch.zeros(B * T, ep, dtype=torch.bool, device=device).scatter_(1, unlimited, True).sum(1)
        assert int(n_dev.max()) > M, "the test batch must need the limit"
        # Real per-rank counts against the single-process routing of the EP group's tokens.
        on_me = rr.topk_idx[group_tokens] // L == dims.ep_rank
        assert r.recv_tokens == int(on_me.any(1).sum())
        assert r.recv_assignments == int(on_me.sum())
        expected_sent = torch.zeros(B * T, ep, dtype=torch.bool, device=device).scatter_(1, rr.topk_idx // L, True)[mine]
        assert torch.equal(r.sent_MP, expected_sent)
        if drop:  # each rank against its real capacity, the same decisions as one process
            assert torch.equal(r.kept, rr.kept[mine])
            assert r.kept[protected[mine]].all()
    if drop:
        assert any(not rr.kept.all() for rr in routers_ref), "the test batch must drop something"

    # Every gradient, after the data-parallel sum.
    sync_gradients(model, dims)
    ref_params = dict(ref.named_parameters())
    rows = slice(dims.ep_rank * L, (dims.ep_rank + 1) * L)
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad[rows] if is_expert_param(name) else ref_params[name].grad
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-5, atol=1e-5 * float(g_ref.abs().max()), msg=name)
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    torch.testing.assert_close(global_grad_norm(model, dims), ref_norm, rtol=1e-5, atol=0)

    # One ZeRO-1 AdamW step (state on one owner per tensor, then broadcast) equals every rank
    # stepping every tensor with plain AdamW on the same summed gradients.
    plain = [p.detach().clone().requires_grad_() for p in model.parameters()]
    for c, p in zip(plain, model.parameters()):
        c.grad = p.grad.clone()
    torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1).step()
    opt = ZeroOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model, dims)
    opt.step()
    n_state = torch.tensor([len([s for s in opt.state.values() if s])], device=device)
    dist.all_reduce(n_state)
    n_dense = sum(1 for n, _ in model.named_parameters() if not is_expert_param(n))
    assert int(n_state) == n_dense + ep * 2 * len(moes(model)), "each tensor stepped by exactly one rank"
    for (name, p), c in zip(model.named_parameters(), plain):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=0, atol=0, msg=name)

    # Export: every rank writes its experts; the result is an ordinary HF-format directory.
    if outdir is not None:
        # Saved with the routing it was trained with (V2's group-limited rule with groups = ranks).
        routed_as_trained = cfg.replace(topk_method="group_limited_greedy", n_group=ep, topk_group=M)
        save_model_parts(model, os.path.join(outdir, "ep"), dims, config=routed_as_trained)
        model.eval()
        with torch.no_grad():
            logits = model(ids)  # every rank the same full batch
        if rank == 0:
            torch.save(logits.cpu(), os.path.join(outdir, "ep_logits.pt"))
            save_model(ref, os.path.join(outdir, "single"))
    dist.barrier()


def test_expert_parallel_2_ranks_matches_one_process(tmp_path):
    run_local(ep_worker, 2, [(2, 1, True, str(tmp_path))])
    # The export loads in the single-process model and gives the EP model's logits.
    exported = load_model(tmp_path / "ep")
    ids = torch.randint(0, VOCAB, (2 * B_LOCAL, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), torch.load(tmp_path / "ep_logits.pt"), rtol=1e-5, atol=1e-5)
    with open(tmp_path / "ep" / "model.safetensors.index.json") as f:
        index = json.load(f)["weight_map"]
    with safe_open(str(tmp_path / "single" / "model.safetensors"), "pt") as f:
        assert sorted(index) == sorted(f.keys())  # the names a single-process save writes
    assert sorted(set(index.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["model.layers.1.mlp.experts.7.down_proj.weight"] == "model-00002-of-00002.safetensors"


def test_expert_parallel_4_ranks_and_2x2_data_x_expert_parallel():
    # EP over 4 ranks (M = 2 of 4, dispatch without overlap), then a (dp 2) x (ep 2) mesh.
    run_local(ep_worker, 4, [(4, 2, False, None), (2, 1, True, None)])


def test_device_keep_mask_protects_then_keeps_highest_affinity():
    aff = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7])
    prot = torch.tensor([False, True, False, False, False])
    assert device_keep_mask(aff, prot, 3).tolist() == [True, True, False, False, True]
    assert device_keep_mask(aff, prot, 5).all()
    assert device_keep_mask(aff, torch.ones(5, dtype=torch.bool), 2).all()  # protected beyond capacity


@pytest.mark.parametrize("ep_size", [3])
def test_experts_must_divide(ep_size):
    model = build_model(tiny_config(), seed=0)
    with pytest.raises(ValueError, match="divisible by parallel.ep_size"):
        apply_expert_parallel(model, None, 0, ep_size)
