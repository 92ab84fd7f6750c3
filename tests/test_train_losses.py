"""Balance losses against hand-computed values, and the router's gradient through each of them."""

from __future__ import annotations

import pytest
import torch

from latentmoe.config import get_config
from latentmoe.model import Router, RouterOutput
from latentmoe.train.losses import balance_losses, balance_terms, cross_entropy

# Two sequences, T=2, E=4 experts in D=2 groups ({0,1}, {2,3}), K=2, M=2.
SCORES = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.2, 0.3, 0.1, 0.4]],
                       [[0.1, 0.1, 0.1, 0.7], [0.7, 0.1, 0.1, 0.1]]])
TOPK = torch.tensor([[[0, 1], [1, 3]],
                     [[3, 2], [0, 1]]])
# By hand, sequence 0: counts [1,2,0,1], f = E/(KT)*counts = counts; P = [.3,.3,.15,.25]
#   L_exp = .3 + .6 + 0 + .25 = 1.15; f' = [1.5, .5], P' = [.6, .4] -> L_dev = .9 + .2 = 1.1
#   sent: t0 -> {d0}, t1 -> {d0,d1}: f'' = D/(MT)*[2,1] = [1, .5] -> L_comm = .6 + .2 = .8
# Sequence 1: f = [1,1,1,1], P = [.4,.1,.1,.4] -> 1.0; f' = [1,1], P' = [.5,.5] -> 1.0;
#   sent [1,1] -> f'' = [.5,.5] -> .5
HAND = {"exp": (1.15 + 1.0) / 2, "dev": (1.1 + 1.0) / 2, "comm": (0.8 + 0.5) / 2}


def test_balance_terms_match_hand_computed_values():
    l_exp, l_dev, l_comm = balance_terms(SCORES, TOPK, devices=2, max_devices=2)
    assert l_exp.item() == pytest.approx(HAND["exp"], abs=1e-6)
    assert l_dev.item() == pytest.approx(HAND["dev"], abs=1e-6)
    assert l_comm.item() == pytest.approx(HAND["comm"], abs=1e-6)


def test_balance_terms_single_sequence_and_m():
    l_exp, l_dev, l_comm = balance_terms(SCORES[:1], TOPK[:1], devices=2, max_devices=1)
    assert l_exp.item() == pytest.approx(1.15, abs=1e-6)
    assert l_dev.item() == pytest.approx(1.1, abs=1e-6)
    assert l_comm.item() == pytest.approx(2 * 0.8, abs=1e-6)  # f'' scales with 1/M


def test_balance_losses_weighted_and_summed_over_layers():
    r = RouterOutput(SCORES.view(4, 4), TOPK.view(4, 2), torch.ones(4, 2))
    out = balance_losses([r, r], batch=2, seq_len=2, devices=2, max_devices=2, alpha1=0.1, alpha2=0.2, alpha3=0.3)
    assert out["exp"].item() == pytest.approx(2 * 0.1 * HAND["exp"], abs=1e-6)
    assert out["dev"].item() == pytest.approx(2 * 0.2 * HAND["dev"], abs=1e-6)
    assert out["comm"].item() == pytest.approx(2 * 0.3 * HAND["comm"], abs=1e-6)


def test_per_sequence_not_pooled():
    # Pooled over the batch, sequence 0's expert-2 deficit and sequence 1's surplus would cancel.
    pooled = balance_terms(SCORES.reshape(1, 4, 4), TOPK.reshape(1, 4, 2), 2, 2)[0].item()
    assert pooled != pytest.approx(HAND["exp"], abs=1e-3)


def test_gradient_of_expert_loss_is_f_over_t():
    # d L_exp / d s_{i,t} = f_i / (T B): the f terms are constants, P is a mean over tokens.
    scores = SCORES.clone().requires_grad_(True)
    l_exp, _, _ = balance_terms(scores, TOPK, 2, 2)
    l_exp.backward()
    f = torch.tensor([[1.0, 2.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    expected = (f / (2 * 2))[:, None, :].expand(2, 2, 4)
    torch.testing.assert_close(scores.grad, expected)


@pytest.mark.parametrize("which", ["exp", "dev", "comm"])
def test_router_receives_gradient_from_each_balance_loss(which):
    cfg = get_config("tiny", hidden_size=16, n_routed_experts=8, num_experts_per_tok=2,
                     topk_method="greedy", n_group=1, topk_group=1)
    torch.manual_seed(0)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.device_limit = (4, 2)
    x = torch.randn(3 * 5, 16)
    scores, weight, idx = router(x)
    alphas = {"alpha1": 0.0, "alpha2": 0.0, "alpha3": 0.0}
    alphas[{"exp": "alpha1", "dev": "alpha2", "comm": "alpha3"}[which]] = 1.0
    out = balance_losses([RouterOutput(scores, idx, weight)], 3, 5, devices=4, max_devices=2, **alphas)
    assert out[which].requires_grad
    out[which].backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_cross_entropy_is_fp32_mean():
    logits = torch.randn(2, 3, 7).bfloat16()
    y = torch.randint(0, 7, (2, 3))
    ref = torch.nn.functional.cross_entropy(logits.float().view(6, 7), y.view(6))
    assert cross_entropy(logits, y).dtype == torch.float32
    torch.testing.assert_close(cross_entropy(logits, y), ref)
