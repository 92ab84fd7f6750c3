"""Optimiser and schedules (report 3.1.2): AdamW without decay on norms/biases, linear warmup then
step decays (x0.316 at 60% and 90% of the token budget), and a linear batch-size ramp."""

from __future__ import annotations

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linears, experts, router, embeddings); not norms, biases or any 1-D tensor."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, oc) -> torch.optim.Optimizer:
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, oc.weight_decay), lr=oc.lr, betas=tuple(oc.betas),
                             eps=oc.eps, fused=bool(oc.fused and on_cuda) or None)


def lr_at(step: int, tokens: int, oc, total_tokens: int) -> float:
    """LR for optimizer step `step` (0-based) after `tokens` tokens: linear warmup over
    warmup_steps, then x decay_factor for each decay fraction of total_tokens already passed."""
    lr = oc.lr * min(1.0, (step + 1) / oc.warmup_steps) if oc.warmup_steps > 0 else oc.lr
    for frac in oc.decay_fractions:
        if tokens >= frac * total_tokens:
            lr *= oc.decay_factor
    return lr


def batch_size_at(tokens: int, tc) -> int:
    """Sequences per step: linear from batch_size_start to batch_size over ramp_tokens, in
    multiples of micro_batch_size (the report ramps 2304 -> 9216 over the first 225B tokens)."""
    if not tc.batch_size_start or tc.ramp_tokens <= 0 or tokens >= tc.ramp_tokens:
        return tc.batch_size
    bs = tc.batch_size_start + (tc.batch_size - tc.batch_size_start) * tokens / tc.ramp_tokens
    mb = tc.micro_batch_size
    return max(mb, int(bs) // mb * mb)


def total_tokens(tc) -> int:
    return tc.tokens or tc.max_steps * tc.batch_size * tc.seq_len


__all__ = ["param_groups", "build_optimizer", "lr_at", "batch_size_at", "total_tokens"]
