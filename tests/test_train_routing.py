"""Device-limited routing and device-level token dropping, against plain reference loops."""

from __future__ import annotations

import math

import torch

from latentmoe.config import get_config
from latentmoe.model import build_model
from latentmoe.train.config import RoutingSection
from latentmoe.train.routing import (DeviceDropper, configure_routing, drop_assignments, inference_config,
                                     protected_tokens)


def _router_cfg(**kw):
    base = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, topk_method="greedy",
                n_group=1, topk_group=1, vocab_size=64)
    base.update(kw)
    return get_config("tiny", **base)


def test_device_limited_routing_uses_at_most_m_groups_and_the_best_experts_there():
    torch.manual_seed(0)
    model = build_model(_router_cfg(), seed=0, std=0.5)
    configure_routing(model, RoutingSection(devices=4, max_devices=2, device_limited=True))
    router = model.model.layers[1].mlp.gate
    x = torch.randn(200, 32)
    scores, _, idx = router(x)
    for t in range(200):
        groups = set((idx[t] // 4).tolist())
        assert len(groups) <= 2
        # Reference: the 2 groups with the highest single affinity, then the top 3 experts in them.
        best_groups = scores[t].view(4, 4).amax(-1).topk(2).indices.tolist()
        allowed = [e for e in range(16) if e // 4 in best_groups]
        ref = sorted(sorted(allowed, key=lambda e: -scores[t, e].item())[:3])
        assert sorted(idx[t].tolist()) == ref
    # Without the limit, some tokens do reach more than 2 groups (so the test can fail).
    configure_routing(model, RoutingSection(devices=4, max_devices=2, device_limited=False))
    _, _, idx_free = router(x)
    assert max(len(set((row // 4).tolist())) for row in idx_free) > 2


def _drop_reference(scores, idx, devices, cf, protected):
    M, E = scores.shape
    K = idx.shape[1]
    cap = math.ceil(cf * M * K / devices)
    keep = torch.zeros(M, K, dtype=torch.bool)
    for d in range(devices):
        items = [(t, k) for t in range(M) for k in range(K) if idx[t, k] // (E // devices) == d]
        prot = [(t, k) for t, k in items if protected[t]]
        rest = sorted((it for it in items if not protected[it[0]]), key=lambda it: -scores[it[0], idx[it]].item())
        for t, k in prot:
            keep[t, k] = True
        for t, k in rest[:max(0, cap - len(prot))]:
            keep[t, k] = True
    return keep


def test_dropping_respects_capacity_protects_sequences_and_drops_lowest_affinity():
    torch.manual_seed(1)
    M, E, K, D = 64, 8, 2, 4
    # Skewed affinities so some devices are over capacity.
    scores = (torch.randn(M, E) + torch.tensor([2.0, 1.5, 0, 0, 0, 0, -1, -1])).softmax(-1)
    idx = scores.topk(K, dim=-1).indices
    protected = protected_tokens(4, 16, 0.25, torch.Generator().manual_seed(0))  # 1 of 4 sequences
    assert protected.sum() == 16
    keep = drop_assignments(scores, idx, D, 1.0, protected)
    assert torch.equal(keep, _drop_reference(scores, idx, D, 1.0, protected))
    cap = math.ceil(M * K / D)
    dev = idx // (E // D)
    for d in range(D):
        unprotected_kept = (keep & (dev == d) & ~protected[:, None]).sum().item()
        protected_kept = ((dev == d) & protected[:, None]).sum().item()
        assert unprotected_kept + protected_kept <= max(cap, protected_kept)
    assert keep[protected].all()
    assert not keep.all()  # something was over capacity


def test_dropping_is_off_in_eval_and_on_in_training():
    cfg = _router_cfg(num_hidden_layers=2, first_k_dense_replace=0)
    model = build_model(cfg, seed=0, std=0.5)
    ids = torch.randint(0, 64, (2, 16))
    plain = model.eval()(ids)
    dropper = configure_routing(model, RoutingSection(devices=4, max_devices=4, drop_tokens=True,
                                                      capacity_factor=0.5))
    assert isinstance(dropper, DeviceDropper)
    _, routers = model.eval()(ids, return_router=True)
    assert all(r.kept is None for r in routers)
    torch.testing.assert_close(model(ids), plain, rtol=0, atol=0)
    model.train()
    logits, routers = model(ids, return_router=True)
    assert all(r.kept is not None and not r.kept.all() for r in routers)  # cf 0.5: half must go
    assert not torch.allclose(logits, plain)


def test_inference_config_records_device_limit_as_group_limited_greedy():
    cfg = _router_cfg()
    out = inference_config(cfg, RoutingSection(devices=4, max_devices=2, device_limited=True))
    assert (out.topk_method, out.n_group, out.topk_group) == ("group_limited_greedy", 4, 2)
    assert inference_config(cfg, RoutingSection()) is cfg
