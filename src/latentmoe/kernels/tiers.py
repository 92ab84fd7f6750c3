"""Where the kernels stop choosing by a step's token count.

Start-up compiles every kernel variant a step can reach (engine/model_runner.py). A variant is a Triton
specialisation (integer arguments equal to 1 or divisible by 16) crossed with the tile or path the kernels
pick by token count. Above the last of those tiers only divisibility still varies, and one dense stretch of
warm-up sizes past it has met every combination. From there on, warm-up needs only a few sizes per octave,
for the attention libraries that plan per shape. At a 65,536-token budget that is a fraction of the dummy
tokens a dense ladder of sizes would run.
"""
from __future__ import annotations

import math

from .fp8 import FP8_ACTIVATION_MIN_ROWS
from .fp8_moe import FP8_ACTIVATIONS_MIN_PER_EXPERT, W8A8_PREFILL_MIN_PER_EXPERT
from .moe import ALIGN_SERIAL_COUNT_MAX_ASSIGNMENTS, FEW_TOKENS, MOE_CONFIG_TIERS
from .prefill import CUDNN_MIN_CHUNK
from .skinny import SKINNY_MAX_ROWS


def last_token_tier(top_k: int, n_experts: int) -> int:
    """The smallest token count from which no kernel's choice depends on how many tokens a step has, for routed
    experts of this shape (top_k 0 or no experts: a dense model)."""
    tokens = [FP8_ACTIVATION_MIN_ROWS + 1, SKINNY_MAX_ROWS + 1, FEW_TOKENS + 1, CUDNN_MIN_CHUNK]
    if top_k and n_experts:
        per_expert = max(*MOE_CONFIG_TIERS, W8A8_PREFILL_MIN_PER_EXPERT, FP8_ACTIVATIONS_MIN_PER_EXPERT)
        assignments = max(per_expert * n_experts, ALIGN_SERIAL_COUNT_MAX_ASSIGNMENTS + 1)
        tokens.append(math.ceil(assignments / top_k))
    return max(tokens)


__all__ = ["last_token_tier"]
