"""Training losses: next-token cross-entropy and DeepSeek-V2's three balance losses (report 2.2.3).

Legend: B sequences, T tokens per sequence, E routed experts, K experts per token, D device
groups (experts split evenly, E/D per group), M devices a token may reach.

    f_i   = E/(K T) sum_t 1(t picks i)          P_i   = 1/T sum_t s_{i,t}
    L_exp = a1 sum_i f_i P_i
    L_dev = a2 sum_d f'_d P'_d                  f'_d  = mean_{j in d} f_j,  P'_d = sum_{j in d} P_j
    L_com = a3 sum_d f''_d P'_d                 f''_d = D/(M T) sum_t 1(t is sent to group d)

All per sequence, averaged over the batch, summed over MoE layers. The f terms are counts (no
gradient); the gradient reaches the router only through P, i.e. through the fp32 affinities s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def balance_terms(scores_BTE: torch.Tensor, topk_idx_BTK: torch.Tensor, devices: int,
                  max_devices: int, sent_BTD: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unweighted (sum f P) expert-, device- and communication-level terms of one MoE layer.

    sent_BTD: what expert parallelism really dispatched (token t sent to rank d); default: derived
    from the routing, which is the same thing when group d is rank d."""
    B, T, E = scores_BTE.shape
    K = topk_idx_BTK.shape[-1]
    D, G = devices, E // devices
    with torch.no_grad():
        counts_BE = torch.zeros(B, E, device=scores_BTE.device, dtype=torch.float32)
        counts_BE.scatter_add_(1, topk_idx_BTK.reshape(B, T * K),
                               torch.ones(B, T * K, device=scores_BTE.device, dtype=torch.float32))
        f_BE = counts_BE * (E / (K * T))
        f_dev_BD = f_BE.view(B, D, G).mean(-1)
        # A token is sent to group d once, however many of its K experts live there.
        if sent_BTD is None:
            sent_BTD = torch.zeros(B, T, D, device=scores_BTE.device, dtype=torch.bool)
            sent_BTD.scatter_(2, topk_idx_BTK // G, True)
        f_comm_BD = sent_BTD.sum(1, dtype=torch.float32) * (D / (max_devices * T))
    P_BE = scores_BTE.float().mean(1)
    P_dev_BD = P_BE.view(B, D, G).sum(-1)
    l_exp = (f_BE * P_BE).sum(-1).mean()
    l_dev = (f_dev_BD * P_dev_BD).sum(-1).mean()
    l_comm = (f_comm_BD * P_dev_BD).sum(-1).mean()
    return l_exp, l_dev, l_comm


def balance_losses(routers, batch: int, seq_len: int, devices: int, max_devices: int,
                   alpha1: float, alpha2: float, alpha3: float) -> dict[str, torch.Tensor]:
    """Weighted balance losses summed over the MoE layers' RouterOutputs (pre-drop choices)."""
    zero = torch.zeros((), device=routers[0].scores.device) if routers else torch.zeros(())
    out = {"exp": zero, "dev": zero, "comm": zero}
    for r in routers:
        E, K = r.scores.shape[-1], r.topk_idx.shape[-1]
        sent = getattr(r, "sent_MP", None)  # set by latentmoe.parallel's expert-parallel layer
        if sent is not None and sent.shape[-1] != devices:
            raise ValueError(f"routing.devices ({devices}) must equal the expert-parallel size ({sent.shape[-1]})")
        l_exp, l_dev, l_comm = balance_terms(r.scores.view(batch, seq_len, E), r.topk_idx.view(batch, seq_len, K),
                                             devices, max_devices,
                                             None if sent is None else sent.view(batch, seq_len, devices))
        out["exp"] = out["exp"] + alpha1 * l_exp
        out["dev"] = out["dev"] + alpha2 * l_dev
        out["comm"] = out["comm"] + alpha3 * l_comm
    return out


def cross_entropy(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in fp32 (logits may be bf16 under autocast)."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())


__all__ = ["balance_terms", "balance_losses", "cross_entropy"]
