"""The inference engine: paged latent cache, continuous batching, offline and async generation.

One concept per file: sequence, block_manager, scheduler, model_runner, llm_engine, async_engine;
config (EngineConfig), kv_cache (cache layouts and the planner), attention (the layouts' backends),
layers (the engine's own module tree with fused forwards), sampling; for tensor_parallel_size > 1,
tensor_parallel (one rank's share of the model) and distributed (the processes and their steps).
"""

from .config import EngineConfig
from .kv_cache import CacheLayout, LatentCache, PerHeadCache
from .llm_engine import LLM
from .sampling import SamplingParams
from .sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "CacheLayout",
           "LatentCache", "PerHeadCache", "AsyncLLM", "QueueFullError", "ParallelError"]


def __getattr__(name):
    # asyncio is only imported by those who serve.
    if name in ("AsyncLLM", "QueueFullError"):
        from . import async_engine
        return getattr(async_engine, name)
    if name == "ParallelError":   # torch.distributed only for those who run several processes
        from .distributed import ParallelError
        return ParallelError
    raise AttributeError(f"module 'latentmoe.engine' has no attribute {name!r}")
