"""Scaling out: expert parallelism and ZeRO-1 data parallelism on torch.distributed for training
(`training.TrainParallel` is the trainer's plan for many processes).

Everything here is applied from outside a built single-device model; checkpoints of a sharded
run are written by `latentmoe.checkpoint.training`.
"""

from .expert_parallel import EPRouterOutput, ExpertParallelMoE, apply_expert_parallel, is_expert_param
from .mesh import ParallelDims, init_parallel

__all__ = ["ParallelDims", "init_parallel", "ExpertParallelMoE", "EPRouterOutput", "apply_expert_parallel",
           "is_expert_param"]
