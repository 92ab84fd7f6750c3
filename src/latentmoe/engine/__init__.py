"""The inference engine: paged latent cache, continuous batching, offline and async generation."""

from .llm_engine import LLM
from .sampling import SamplingParams
from .sequence import CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "AsyncLLM", "QueueFullError"]


def __getattr__(name):
    # asyncio is only imported by those who serve.
    if name in ("AsyncLLM", "QueueFullError"):
        from . import async_engine
        return getattr(async_engine, name)
    raise AttributeError(f"module 'latentmoe.engine' has no attribute {name!r}")
