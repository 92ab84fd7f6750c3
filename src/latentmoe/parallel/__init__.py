"""Scaling out on torch.distributed: expert parallelism, ZeRO-1 data parallelism, sharded checkpoints.

Everything here is applied from outside a built single-device model; see docs/scaling.md.
"""

from .expert_parallel import EPRouterOutput, ExpertParallelMoE, apply_expert_parallel, is_expert_param
from .mesh import ParallelDims, init_parallel

__all__ = ["ParallelDims", "init_parallel", "ExpertParallelMoE", "EPRouterOutput", "apply_expert_parallel",
           "is_expert_param"]
