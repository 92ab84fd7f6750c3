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
    g.add_argument("--revision", default=None,
                   help="branch, tag or commit of a hub model id (default: main); the hub cache is "
                        "HF_HOME/HF_HUB_CACHE, HF_HUB_OFFLINE=1 uses it without the network")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="bfloat16 / float16 / float32 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences batched together at most")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default on CUDA: 16384, serve 8192; CPU: 2048)")
    g.add_argument("--block-size", type=int, default=64, help="tokens per cache block")
    g.add_argument("--cache-memory-gb", type=float, default=None, help="cache budget (default: automatic)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory the engine may use; the cache gets what the rest leaves")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse cached blocks of shared prompt prefixes (default: on)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help=argparse.SUPPRESS)
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (start-up still compiles the kernels)")
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


def check_device(device: str | None) -> None:
    """A CUDA device asked for must exist here (ValueError, one line), checked before any loading."""
    import torch

    if device is None or not str(device).startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                         f"use --device cpu or a CUDA build of torch")
    try:
        index = torch.device(device).index
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device such as 'cuda', 'cuda:1' or 'cpu'") from None
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def engine_config(args):
    """The EngineConfig of parsed `add_engine_args` arguments (ValueError, naming the field, if invalid;
    also when the device asked for is not there)."""
    from ..engine import EngineConfig
    check_device(args.device)
    return EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                        block_size=args.block_size, cache_memory_gb=args.cache_memory_gb,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                        experts_impl=None if args.experts == "auto" else args.experts,
                        fused_ops=None if args.fused_ops == "auto" else args.fused_ops == "on",
                        kv_cache=args.kv_cache, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)


def prepare(args, name: str) -> str:
    """Check the engine arguments and find the checkpoint before anything is loaded: its local directory."""
    engine_config(args)
    if args.ep < 1:
        raise ValueError(f"--ep must be a positive integer, got {args.ep}")
    return checkpoint_dir(args, name)


def checkpoint_dir(args, name: str) -> str:
    """The local directory of the checkpoint `name` (a directory, or a hub model id fetched into the hub cache)."""
    from ..checkpoint import resolve_checkpoint
    return resolve_checkpoint(name, getattr(args, "revision", None))


def build_llm(args, path: str):
    """The engine for the checkpoint `path` (a directory; a hub model id also works, but `checkpoint_dir` first
    applies --revision and fails before anything is loaded), from parsed `add_engine_args` arguments."""
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
