"""Benchmarks a user runs (`latentmoe bench throughput|latency|serve`): offline engine throughput (beside
transformers on the same prompts, optionally), one batch's prefill and per-token latency, and HTTP load
against any OpenAI-compatible server. Each returns a plain dict (the --json result) and prints a table.
"""
from .offline import latency, random_prompts, throughput, transformers_throughput
from .serve import serve_load
from .stats import percentiles

__all__ = ["throughput", "latency", "transformers_throughput", "random_prompts", "serve_load", "percentiles"]
