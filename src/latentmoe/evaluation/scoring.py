"""The log-probability the model gives each token of a sequence: what `echo` + `logprobs` report for a prompt
(lm-evaluation-harness's log-likelihood requests) and what perplexity sums.

A plain forward of the model over the whole sequence (no cache): scoring needs every position's distribution,
which the engine's decode path never forms. Log-softmax in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sequence_logprobs(model, ids_BT: torch.Tensor) -> torch.Tensor:
    """ids [B, T] (equal lengths) -> log p(ids[:, i] | ids[:, :i]) for i >= 1, [B, T-1] fp32."""
    logits_BTV = model(ids_BT)[:, :-1]            # position i predicts token i+1
    targets_BT = ids_BT[:, 1:]
    # fp32 one row at a time: a [T, V] copy rather than [B, T, V] (V is 102400 for DeepSeek-V2).
    return torch.stack([logits_BTV[b].float().log_softmax(-1).gather(1, targets_BT[b, :, None])[:, 0]
                        for b in range(ids_BT.shape[0])])


@torch.no_grad()
def token_logprobs(model, token_ids: list[int], top_k: int = 0) -> tuple[list[float], list[dict[int, float]] | None]:
    """For tokens 1..T-1 of `token_ids`: log p(token_i | tokens_<i), and (with `top_k` > 0) the `top_k` most likely
    tokens at each position with their log-probabilities (the token itself always included, as vLLM reports)."""
    device = next(model.parameters()).device
    ids_BT = torch.tensor([token_ids], dtype=torch.long, device=device)
    logprobs_TV = model(ids_BT)[0, :-1].float().log_softmax(-1)   # position i predicts token i+1
    targets_T = ids_BT[0, 1:]
    chosen = logprobs_TV.gather(1, targets_T[:, None])[:, 0].tolist()
    if top_k <= 0:
        return chosen, None
    top_vals, top_ids = (t.tolist() for t in logprobs_TV.topk(min(top_k, logprobs_TV.shape[-1]), dim=-1))
    tops = []
    for tid, lp, vals, ids in zip(targets_T.tolist(), chosen, top_vals, top_ids):
        row = dict(zip(ids, vals))
        row.setdefault(tid, lp)
        tops.append(row)
    return chosen, tops
