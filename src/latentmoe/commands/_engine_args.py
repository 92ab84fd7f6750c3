"""The engine's options on the command line, shared by `serve`, `generate` and `chat`: one argument group
that maps onto EngineConfig (which validates them), and the one place a command builds its engine.
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
                   help="tokens per step (default on CUDA: the largest of 131072, 65536, 32768, 16384 whose step "
                        "activations take at most 8%% of the GPU's memory; serve and chat: 8192; CPU: 2048)")
    g.add_argument("--prefill-hold-steps", type=int, default=0,
                   help="steps a new request may wait while others decode, so that arrivals prefill together "
                        "(decode-only steps replay a CUDA graph); default 0: admitted at once")
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
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="queue the next step before reading this one's tokens, so the host's work per step "
                        "overlaps the device's (default: on; one process, not while requests wait)")
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
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="run on N devices, one process each (cuda:0..N-1, or N CPU processes with --device cpu): "
                        "attention split by heads, MLPs and experts by width")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="with -tp N: whole routed experts spread over the N ranks instead of a slice of each")


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


# The token budget on CUDA of the commands that take requests as they come (serve, chat): a few prompts a step,
# where short steps between tokens matter more than the offline default's long ones (vLLM's serving default
# too), and a smaller budget also warms up sooner (H100, V2-Lite, max_model_len 131,136, warm kernel cache:
# ready in 25 / 31 / 44 s at 16,384 / 32,768 / 65,536).
INTERACTIVE_BUDGET = 8192


def use_interactive_budget(args) -> None:
    """Set --max-num-batched-tokens to INTERACTIVE_BUDGET where it was not given and the engine runs on CUDA."""
    if args.max_num_batched_tokens is None and (args.device or "cuda").startswith("cuda"):
        import torch
        if torch.cuda.is_available():
            args.max_num_batched_tokens = INTERACTIVE_BUDGET


def engine_config(args):
    """The EngineConfig of parsed `add_engine_args` arguments (ValueError, naming the field, if invalid;
    also when the device asked for is not there)."""
    from ..engine import EngineConfig
    check_device(args.device)
    return EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                        prefill_hold_steps=args.prefill_hold_steps,
                        block_size=args.block_size, cache_memory_gb=args.cache_memory_gb,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
                        async_scheduling=args.async_scheduling,
                        experts_impl=None if args.experts == "auto" else args.experts,
                        fused_ops=None if args.fused_ops == "auto" else args.fused_ops == "on",
                        kv_cache=args.kv_cache, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                        tensor_parallel_size=args.tensor_parallel_size,
                        enable_expert_parallel=args.enable_expert_parallel)


def prepare(args, name: str) -> str:
    """Check the engine arguments and find the checkpoint before anything is loaded: its local directory."""
    engine_config(args)
    return checkpoint_dir(args, name)


def checkpoint_dir(args, name: str) -> str:
    """The local directory of the checkpoint `name` (a directory, or a hub model id fetched into the hub cache)."""
    from ..checkpoint import resolve_checkpoint
    return resolve_checkpoint(name, getattr(args, "revision", None))


def build_llm(args, path: str, tokenizer=None):
    """The engine for the checkpoint `path` (a directory; a hub model id also works, but `checkpoint_dir` first
    applies --revision and fails before anything is loaded), from parsed `add_engine_args` arguments.
    `tokenizer`: the checkpoint's, when the caller has loaded it already (else the engine loads it)."""
    import logging

    # The engine reports its cache (blocks, tokens, concurrency vs an MHA cache) at INFO on start.
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ..engine import LLM

    _check_attention(path)
    return LLM(path, tokenizer=tokenizer, config=engine_config(args))


def _check_attention(path: str) -> None:
    """Refuse an attention baseline (mha/gqa/mqa) from its config.json, before loading any weights."""
    import os

    from ..config import ModelConfig
    from ..engine.kv_cache import check_servable
    if os.path.isfile(os.path.join(path, "config.json")):
        check_servable(ModelConfig.from_json(path))
