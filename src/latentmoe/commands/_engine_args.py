"""The engine's options on the command line, shared by `serve`, `generate` and `chat`: one argument group
that maps onto EngineConfig (which validates them), and the one place a command builds its engine.

`--ep N` is not an engine option: it loads the model with its routed experts split over N devices of
this host (parallel.inference) and hands that model to the engine, which then runs without CUDA
graphs (the split layer syncs with the host once per layer).
"""

from __future__ import annotations

import argparse


def add_engine_args(p: argparse.ArgumentParser) -> None:
    # No imports here: registering a command must stay cheap (EngineConfig checks the values).
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences batched together at most")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default: max(2048, max-num-seqs))")
    g.add_argument("--block-size", type=int, default=64, help="tokens per cache block")
    g.add_argument("--cache-memory-gb", type=float, default=None, help="cache budget (default: automatic)")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--experts", choices=["auto", "model", "fused"], default="auto",
                   help="routed-expert path: the Triton fused-MoE kernel ('fused', default on CUDA in bf16/fp16) "
                        "or the model's grouped GEMMs ('model')")
    g.add_argument("--fused-ops", choices=["auto", "on", "off"], default="auto",
                   help="fused RMSNorm / MLA post-projection / router kernels (default: on with CUDA)")
    g.add_argument("--kv-cache", default="latent",
                   help="cache layout: 'latent' (MLA's, default) or 'mha' (the per-head baseline)")
    g.add_argument("--quantization", default=None,
                   help="'fp8': Linears and routed experts in block FP8 (e4m3, 128x128 scales), quantised on load "
                        "or read from a block-FP8 checkpoint (default: the model's dtype)")
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="'auto' (the model's dtype, default) or 'fp8' (e4m3 latent cache with per-token scales)")
    g.add_argument("--ep", type=int, default=1, metavar="N",
                   help="split the routed experts over N GPUs of this host (expert parallelism)")


def engine_config(args):
    """The EngineConfig of parsed `add_engine_args` arguments (ValueError, naming the field, if invalid)."""
    from ..engine import EngineConfig
    return EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                        block_size=args.block_size, cache_memory_gb=args.cache_memory_gb,
                        enable_prefix_caching=not args.no_prefix_caching, enforce_eager=args.enforce_eager,
                        experts_impl=None if args.experts == "auto" else args.experts,
                        fused_ops=None if args.fused_ops == "auto" else args.fused_ops == "on",
                        kv_cache=args.kv_cache, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)


def build_llm(args, path: str):
    """The engine for the checkpoint directory `path`, from parsed `add_engine_args` arguments."""
    import dataclasses
    import logging

    # The engine reports its cache (blocks, tokens, concurrency vs an MHA cache) at INFO on start.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..engine import LLM
    from ..engine.llm_engine import load_tokenizer

    config = engine_config(args)
    if args.ep < 1:
        raise ValueError(f"--ep must be a positive integer, got {args.ep}")
    if args.ep == 1:
        return LLM(path, config=config)
    from ..parallel.inference import load_model_expert_parallel
    model = load_model_expert_parallel(path, args.ep, device=config.device, dtype=config.dtype)
    # The model keeps its placement (experts on N devices): no device/dtype conversion in the engine.
    config = dataclasses.replace(config, device=None, dtype=None, enforce_eager=True)
    return LLM(model, tokenizer=load_tokenizer(path), config=config)
